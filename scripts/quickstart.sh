#!/usr/bin/env bash
# README command 1: install, then run the main job on the embedded database with the bundled model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec harmonia quickstart "$@"
