#!/usr/bin/env bash
# Every committed study's report beside its export (docs/results/<study>/report.html), with
# the metrics its export was made with (each study's README). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
ablate=${ABLATE:-.venv/bin/ablate}
"$ablate" report fashion_cfamily --runs-dir docs/results
"$ablate" report quickstart --runs-dir docs/results
for study in docs/results/recipe_*/; do
  "$ablate" report "$(basename "$study")" --runs-dir docs/results \
    --metrics val/error,test/error,test/error_dropout
done
