#!/usr/bin/env bash
# Set up kn-edit in ./.venv: Python venv, torch (CPU build 2.13.0 unless a torch is already there), the
# package in editable mode with its test extra, and the default offline model. Idempotent: a second run
# installs and downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
    # A bare `torch` requirement can pull a multi-GB CUDA build; 2.13.0 is the CPU build on these machines.
    echo "[setup] installing torch==2.13.0"
    "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
stamp=.venv/.kn-edit-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import kn_edit" 2>/dev/null; then
    echo "[setup] installing kn-edit (editable) and its dependencies"
    "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
    echo "$want" > "$stamp"
fi
# Provisions smollm2-135m into the cache on first use (~30 s), then does nothing.
.venv/bin/kn-edit fetch
