#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole pytest suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
# one intra-op thread: the test models are tiny, and on a busy 2-core machine extra OpenMP threads oversubscribe it
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$root/.venv/bin/python" -m pytest "$@"
