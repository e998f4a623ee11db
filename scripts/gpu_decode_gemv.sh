#!/usr/bin/env bash
# Issue 8 on one GPU, sized for one device call: the quantized-GEMM GPU tests, the decode GEMV sweep and
# table, batch-1 latency in bf16, FP8 (A/B: KILN_DISABLE_FP8_GEMV=1) and INT4-AWQ, a profile of the FP8
# batch-1 step, 128/128 throughput at two engine batch sizes (batch) or with 8,192 requests (short), and
# 1000/1000 with 2,048 requests (long; the default 256 sequences, short runs 1,024), the ratio to
# transformers (hf), and process start to first token of bf16/fp8/int4-awq engines on disk (start).
#   OUT=/tmp/r bash scripts/gpu_decode_gemv.sh [tests] [perf] [latency] [profile] [batch] [short] [long] [hf] [start]
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/kiln-decode-gemv
source scripts/device_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | tee -a "$out/versions.txt"
common=(--dummy-weights --preset llama-3-8b --ignore-eos --json)
bench() {  # name, then kiln bench args (env vars set by the caller apply)
  local name=$1; shift
  local t0=$SECONDS
  timeout ${BENCH_TIMEOUT:-120} python3 -m kiln.cli.main bench "$@" -o "$out/$name" --force \
    >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$? $((SECONDS - t0)) s"
}
for step in ${*:-tests perf latency batch}; do
  case $step in
    tests) t0=$SECONDS
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -v -p no:cacheprovider -m gpu -rs tests/kernels/test_split_k_gemv.py \
        tests/kernels/test_quantized_gemm.py >"$out/pytest.log" 2>&1
      echo "tests rc=$? $((SECONDS - t0)) s: $(grep -cE '(^| )PASSED' "$out/pytest.log") passed, \
$(grep -cE '(^| )(FAILED|ERROR)( |$)' "$out/pytest.log") failed"
      grep -E "FAILED|Error" "$out/pytest.log" | head -20 ;;
    perf) timeout ${PERF_TIMEOUT:-260} python3 tests/kernels/perf_quantized_gemm.py --sweep 2>&1 | tee "$out/perf.txt" \
      | grep -v "OutOfResources" ;;
    latency)
      bench latency-bf16 latency x "${common[@]}" --batch-size 1 --num-requests 3 --input-len 128 --output-len 256
      KILN_DISABLE_FP8_GEMV=1 bench latency-fp8-scaled-mm latency x "${common[@]}" --dummy-quantization fp8 \
        --batch-size 1 --num-requests 3 --input-len 128 --output-len 256
      for q in fp8 int4-awq; do bench "latency-$q" latency x "${common[@]}" --dummy-quantization $q \
        --batch-size 1 --num-requests 3 --input-len 128 --output-len 256; done ;;
    profile) timeout 120 python3 scripts/profile_engine.py --quantization fp8 --num-requests 1 --output-len 256 \
      --top 12 >"$out/profile-fp8-b1.txt" 2>&1; echo "profile rc=$?"; sed -n "/decode steps:/,\$p" "$out/profile-fp8-b1.txt" | cut -c1-160 | head -30 ;;
    short) for q in bf16 fp8; do
        quant=(); [ $q = fp8 ] && quant=(--dummy-quantization fp8)
        BENCH_TIMEOUT=150 bench "tp128-$q-8192" throughput x "${common[@]}" "${quant[@]}" --max-batch-size 1024 --num-requests 8192 \
          --input-len 128 --output-len 128; done ;;
    long) for q in bf16 fp8; do  # the engine's default batch: at 1,024 the KV cache holds < half at full length
        quant=(); [ $q = fp8 ] && quant=(--dummy-quantization fp8)
        BENCH_TIMEOUT=300 bench "tp1000-$q-2048" throughput x "${common[@]}" "${quant[@]}" --num-requests 2048 \
          --input-len 1000 --output-len 1000; done ;;
    hf) BENCH_TIMEOUT=200 bench tp128-vs-hf throughput x "${common[@]}" --backend hf --hf-batch-size 256 \
        --num-requests 512 --input-len 128 --output-len 128 ;;
    start) t0=$SECONDS  # process start to first token of engines on local disk, bf16 / fp8 / int4-awq
      timeout ${START_TIMEOUT:-420} python3 scripts/start_to_first_token.py --make-dummy /tmp/kiln-start \
        --preset llama-3-8b --repeat 2 >"$out/start.txt" 2>&1
      echo "start rc=$? $((SECONDS - t0)) s"; grep -E "built in|median" "$out/start.txt" ;;
    batch) for q in bf16 fp8; do for size in 256 1024; do
        quant=(); [ $q = fp8 ] && quant=(--dummy-quantization fp8)
        bench "tp128-$q-b$size" throughput x "${common[@]}" "${quant[@]}" --max-batch-size $size \
          --num-requests ${SHORT_N:-2048} --input-len 128 --output-len 128; done; done ;;
  esac
done
python3 scripts/summarize_bench.py "$out"
