#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole pytest suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
exec "$root/.venv/bin/python" -m pytest "$@"
