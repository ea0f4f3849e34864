#!/usr/bin/env bash
# Every committed study's export and report, re-made from its journal with the metrics its
# export was made with (each study's README): docs/results/<study>/export/ and report.html.
# Run from anywhere; it trains nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ablate=${ABLATE:-.venv/bin/ablate}
for study in fashion_cfamily quickstart; do
  "$ablate" export "$study" --runs-dir docs/results >/dev/null
  "$ablate" report "$study" --runs-dir docs/results
done
for study in docs/results/recipe_*/; do
  name=$(basename "$study")
  "$ablate" export "$name" --runs-dir docs/results \
    --metrics val/error,test/error,test/error_dropout >/dev/null
  "$ablate" report "$name" --runs-dir docs/results \
    --metrics val/error,test/error,test/error_dropout
done
