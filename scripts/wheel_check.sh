#!/usr/bin/env bash
# The built wheel works outside the checkout: build it, install it into a new virtual environment in a temporary
# folder (torch's CPU wheel first, the other dependencies from the registry), then from another temporary folder
# migrate a fresh embedded database, find the prompt files and run the quickstart. Any error fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/harmonia-wheel-check-XXXXXX")
RUN=$(mktemp -d "${TMPDIR:-/tmp}/harmonia-wheel-run-XXXXXX")

cleanup() {
  local rc=$?
  if [ -x "$WORK/venv/bin/harmonia" ] && [ -d "$WORK/data/pgdata" ]; then
    (cd "$RUN" && "$WORK/venv/bin/harmonia" db stop >/dev/null 2>&1) || true
  fi
  rm -rf "$WORK" "$RUN"
  if [ "$rc" -ne 0 ]; then
    echo "wheel check FAILED (exit $rc)" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT

step() { echo "== wheel check: $*"; }

step "new virtual environment in $WORK/venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip

step "build the wheel"
"$VPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$CHECKOUT"
WHEEL=$(ls "$WORK"/dist/harmonia-*.whl)
for needed in harmonia/_resources/migrations/001_vocab.sql harmonia/_resources/prompts/v1/rerank_tool.json \
              harmonia/_resources/data/sample/vocab/CONCEPT.csv.gz harmonia/review/web/templates/review.html; do
  "$VPY" -c "import sys, zipfile; sys.exit(0 if sys.argv[2] in zipfile.ZipFile(sys.argv[1]).namelist() else 1)" \
    "$WHEEL" "$needed" || { echo "the wheel lacks $needed" >&2; exit 1; }
done

step "install torch (CPU) first, then $(basename "$WHEEL") with its dependencies"
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q "$WHEEL"

# Outside the checkout, on a fresh data directory and the embedded server; nothing reaches for a model hub.
cd "$RUN"
unset HARMONIA_DATABASE_URL HARMONIA_CONFIG HARMONIA_RESOURCES PYTHONPATH
export HARMONIA_DATA_DIR="$WORK/data" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$WORK/runtime}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
H="$WORK/venv/bin/harmonia"

SITE=$("$VPY" -c "import harmonia, os; print(os.path.dirname(harmonia.__file__))")
case "$SITE" in
  "$CHECKOUT"*) echo "harmonia was imported from the checkout ($SITE), not from the wheel" >&2; exit 1 ;;
esac

step "harmonia db migrate"
"$H" db migrate
step "harmonia llm prompt"
PROMPT=$("$H" llm prompt)
echo "$PROMPT"
case "$PROMPT" in
  *"$SITE/_resources/prompts/v1"*) ;;
  *) echo "harmonia llm prompt did not find the packaged prompt files under $SITE/_resources" >&2; exit 1 ;;
esac
step "harmonia quickstart"
"$H" quickstart
step "harmonia db stop"
"$H" db stop
echo "wheel check passed: $(basename "$WHEEL") installs, migrates, finds its prompts and runs the quickstart"
