#!/usr/bin/env bash
# README command 2: install, then the linter, the type checker and the test suite (real embedded PostgreSQL, real
# model). `--fast` skips the tests marked slow (model training, the browser, multi-process workers).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
markers=()
if [ "${1:-}" = "--fast" ]; then
  shift
  markers=(-m "not slow")
fi
ruff check harmonia tests benchmark scripts
mypy
exec python -m pytest "${markers[@]}" "$@"
