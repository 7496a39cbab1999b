#!/usr/bin/env bash
# README command 2: install, then run the linter and the test suite (real embedded PostgreSQL, real model).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check harmonia tests benchmark scripts
exec python -m pytest "$@"
