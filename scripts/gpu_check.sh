#!/usr/bin/env bash
# Runs the test suite on a GPU machine whose python already has torch/transformers (the device image):
# GPU-marked tests included. Tests that need the built-in model's 98 MB GGUF file (not on that machine)
# are deselected. Logs go to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/kiln"  # the repo root is the `kiln` package
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())" | tee "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider -k "not builtin and not gguf" -rs "$@" 2>&1 | tee "$out/pytest.log"
