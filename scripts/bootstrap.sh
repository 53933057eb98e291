#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install slt_tools with its dev, hf and tl extras (the tests
# of Hugging Face / TransformerLens head restrictions need them: about 30 s and 400 MB on top of dev).
# torch is pinned to the CPU build that lies on this machine's disk (2.13.0) so pip never pulls a CUDA build;
# pyproject.toml declares torch>=2.3, which that pin satisfies. Re-runs are no-ops unless pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.slt_tools_installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[bootstrap] installing into $venv" >&2
    log="$venv/install.log"; : > "$log"
    "$venv/bin/python" -m pip install -q --upgrade pip >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    "$venv/bin/python" -m pip install -q "torch==${SLT_TORCH_VERSION:-2.13.0}" >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    "$venv/bin/python" -m pip install -q -e "$root[dev,hf,tl]" >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
