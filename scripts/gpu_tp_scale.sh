#!/usr/bin/env bash
# Issue 9 on a multi-GPU device machine, sized for a few minutes: the GPU tensor-parallel tests at TP=$TP
# (default 4) and the sampler's Triton draw test, then `kiln bench throughput` of the Llama-3-70B shape
# (random weights) on $TP GPUs, and batch-1 latency of the 8B shape at TP=1 and TP=$TP (LATENCY=1).
# Results land in $OUT (default /tmp/kiln-tp-scale); a summary table is printed last.
set -uo pipefail
tp=${TP:-4}
cd "$(dirname "$0")/.."
out=/tmp/kiln-tp-scale
source scripts/device_env.sh
nvidia-smi topo -m >"$out/topology.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())" | tee "$out/versions.txt"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -rs \
  "tests/runtime/test_tensor_parallel_gpu.py::test_gpu_tp_bf16_greedy_tokens_agree_with_one_gpu[$tp]" \
  "tests/runtime/test_tensor_parallel_gpu.py::test_gpu_tp_fp32_tokens_and_prompt_logprobs_equal_one_gpu[$tp]" \
  tests/runtime/test_sampler.py::test_the_triton_draw_equals_the_reference >"$out/pytest-tp$tp.log" 2>&1
echo "tests rc=$? $(tail -1 "$out/pytest-tp$tp.log")"
name=throughput-70b-bf16-tp$tp
timeout ${BENCH_TIMEOUT:-220} python3 -m kiln.cli.main bench throughput x --dummy-weights --preset llama-3-70b \
  --ignore-eos --json --tp-size $tp --num-requests ${NUM_REQUESTS:-1024} --input-len 128 --output-len 128 \
  -o "$out/$name" --force >"$out/$name.json" 2>"$out/$name.log"
echo "$name rc=$?"
if [ -n "${LATENCY:-}" ]; then
  for size in 1 $tp; do
    name=latency-bf16-tp$size
    timeout 120 python3 -m kiln.cli.main bench latency x --dummy-weights --preset llama-3-8b --ignore-eos --json \
      --batch-size 1 --num-requests 3 --input-len 128 --output-len 256 --tp-size $size \
      -o "$out/$name" --force >"$out/$name.json" 2>"$out/$name.log"
    echo "$name rc=$?"
  done
fi
python3 scripts/summarize_bench.py "$out"
