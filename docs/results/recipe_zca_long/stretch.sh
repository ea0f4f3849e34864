#!/usr/bin/env bash
# One stretch of recipe_zca_long (README.md beside this file): the sweep on one core, stopped
# with SIGTERM after STRETCH seconds (default 2400) as a cluster's time limit stops a job;
# the next stretch continues its trial from the last epoch checkpoint. Run from the
# repository root: docs/results/recipe_zca_long/stretch.sh [STRETCH]
set -uo pipefail
stretch=${1:-2400}
timeout -s TERM "$stretch" taskset -c 1 .venv/bin/ablate sweep sweeps/recipe_zca_long.yaml \
  --workers 1 --runs-dir docs/results --wandb disabled
echo "stretch ended: exit $?"
