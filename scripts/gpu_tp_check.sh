#!/usr/bin/env bash
# Issue 9 on a multi-GPU device machine: the GPU tensor-parallel tests, then batch-1 latency of the
# Llama-3-8B shape at TP=1 and TP=2 (and TP=4 with 4 GPUs) in the same call. Results land in $OUT.
#   bash scripts/gpu_tp_check.sh [quants...]   (default: bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/kiln-tp
source scripts/device_env.sh
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi topo -m >"$out/topology.txt" 2>&1
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rs tests/runtime/test_tensor_parallel_gpu.py \
  >"$out/pytest-tp.log" 2>&1
echo "tp tests rc=$? $(tail -1 "$out/pytest-tp.log")"
sizes="1 2"; [ "$gpus" -ge 4 ] && sizes="1 2 4"
for q in ${*:-bf16}; do
  quant=(); [ "$q" != bf16 ] && quant=(--dummy-quantization "$q")
  for tp in $sizes; do
    name="latency-$q-tp$tp"
    timeout 240 python3 -m kiln.cli.main bench latency x --dummy-weights --preset llama-3-8b --ignore-eos --json \
      "${quant[@]}" --batch-size 1 --num-requests 3 --input-len 128 --output-len 256 --tp-size "$tp" \
      -o "$out/$name" --force >"$out/$name.json" 2>"$out/$name.log"
    echo "$name rc=$?"
  done
done
python3 scripts/summarize_bench.py "$out"
