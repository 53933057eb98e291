#!/usr/bin/env bash
# The README's main job: installs what it needs, then runs the DLN staircase study end to end
# (train -> checkpoints -> LLC trajectory -> stages -> W&B offline run + figures + report in runs/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT="${WANDB_SILENT:-true}" MPLBACKEND="${MPLBACKEND:-Agg}"
exec "$root/.venv/bin/python" experiments/dln_staircase.py "$@"
