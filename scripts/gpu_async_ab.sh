#!/usr/bin/env bash
# Async scheduling on a GPU machine (issue 8, and issue 9's TP=2 batch-1 speed-up), sized for one device call:
# the GPU tests named in $TESTS (default: the engine's GPU parity tests and the TP=2 GPU tests), then A/B runs
# of `kiln bench` with KILN_DISABLE_ASYNC_SCHEDULING=1 (off) and without (on), in the same call:
# batch-1 latency of the Llama-3-8B shape at TP=1 (and TP=2 when 2 GPUs are there), and 128/128 throughput.
#   OUT=/tmp/ab bash scripts/gpu_async_ab.sh [latency] [throughput] [fp8] [long]
# Results and logs land in $OUT; the summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/kiln-async-ab
source scripts/device_env.sh
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | tee -a "$out/versions.txt"
tp=tests/runtime/test_tensor_parallel_gpu.py
tests=${TESTS-"tests/runtime/test_engine.py tests/runtime/test_sampler.py tests/runtime/test_quantized_engine.py \
$tp::test_gpu_tp_bf16_greedy_tokens_agree_with_one_gpu[2] $tp::test_gpu_tp_fp32_tokens_and_prompt_logprobs_equal_one_gpu[2] \
$tp::test_a_worker_killed_mid_step_ends_the_run_with_an_error"}
if [ -n "$tests" ]; then
  t0=$SECONDS
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -v -p no:cacheprovider -m gpu -rs \
    -o log_cli=true --log-cli-level=WARNING $tests >"$out/pytest.log" 2>&1
  echo "tests rc=$? $((SECONDS - t0)) s: $(grep -cE '(^| )PASSED' "$out/pytest.log") passed, \
$(grep -cE '(^| )(FAILED|ERROR)( |$)' "$out/pytest.log") failed"
fi
common=(--dummy-weights --preset llama-3-8b --ignore-eos --json)
bench() {  # name, async (on|off), then kiln bench args
  local name=$1 mode=$2; shift 2
  local t0=$SECONDS
  if [ "$mode" = off ]; then export KILN_DISABLE_ASYNC_SCHEDULING=1; else unset KILN_DISABLE_ASYNC_SCHEDULING; fi
  timeout ${BENCH_TIMEOUT:-150} python3 -m kiln.cli.main bench "$@" -o "$out/$name" --force \
    >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$? $((SECONDS - t0)) s"
}
for step in ${*:-latency throughput}; do
  case $step in
    latency) sizes=1; [ "$gpus" -ge 2 ] && sizes="1 2"
      for tp in $sizes; do for mode in off on; do
        bench "latency-tp$tp-async-$mode" $mode latency x "${common[@]}" --batch-size 1 --num-requests 3 \
          --input-len 128 --output-len 256 --tp-size $tp; done; done ;;
    throughput) for mode in off on; do
        bench "tp128-bf16-async-$mode" $mode throughput x "${common[@]}" --num-requests ${SHORT_N:-2048} \
          --input-len 128 --output-len 128; done ;;
    fp8) for mode in off on; do
        bench "tp128-fp8-async-$mode" $mode throughput x "${common[@]}" --dummy-quantization fp8 \
          --num-requests ${SHORT_N:-2048} --input-len 128 --output-len 128; done ;;
    long) for mode in off on; do
        bench "tp1000-bf16-async-$mode" $mode throughput x "${common[@]}" --num-requests ${LONG_N:-256} \
          --input-len 1000 --output-len 1000; done ;;
  esac
done
python3 scripts/summarize_bench.py "$out"
