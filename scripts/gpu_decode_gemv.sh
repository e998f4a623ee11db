#!/usr/bin/env bash
# Issue 8 on one GPU, sized for one device call: the GEMV and decode-attention GPU tests, the decode-attention
# tile sweep (attnsweep), the decode GEMV sweeps and tables (quantized: perf; dense bf16: dense), batch-1
# latency in bf16 (A/B: the dense GEMV off, the decode merge in the split kernel), FP8 (A/B: KILN_DISABLE_FP8_GEMV=1) and INT4-AWQ, a profile of the FP8
# batch-1 step, 128/128 throughput at two engine batch sizes (batch) or with 8,192 requests (short), and
# 1000/1000 with 2,048 requests (long; the default 256 sequences, short runs 1,024; both take QUANTS: bf16 fp8
# int4-awq), the ratio to transformers (hf), and process start to first token of engines on disk (start:
# START_QUANTS, fp8 and int4-awq).
#   OUT=/tmp/r bash scripts/gpu_decode_gemv.sh [tests] [gputests] [prefill] [attn] [attnsweep] [perf] [dense] [latency] [rows] [profile] [batch] [short] [long] [hf] [start]
# rows: int4-awq latency at batch 2 and 4 with the floats and the half2 loops of the 2-4 row GEMV.
# DENSE_ARGS="--per-layer --budget-s 240" (with PERF_TIMEOUT=300) makes the dense step time each layer alone.
# LATENCY="bf16 bf16-cublas bf16-merge bf16-nopdl fp8 fp8-scaled-mm fp8-merge fp8-silu fp8-rows fp8-rope int4-awq
# int4-awq-bytes int4-awq-words" picks the latency runs (suffixes: the A/B switch turned on for that run, docs/bench.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/kiln-decode-gemv
source scripts/device_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | tee -a "$out/versions.txt"
common=(--dummy-weights --preset llama-3-8b --ignore-eos --json)
for step in ${*:-tests perf latency batch}; do
  case $step in
    tests) t0=$SECONDS
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -v -p no:cacheprovider -m gpu -rs ${TESTS:-tests/kernels/test_split_k_gemv.py \
        tests/kernels/test_quantized_gemm.py tests/kernels/test_dense_gemv.py tests/kernels/test_triton_attention.py tests/kernels/test_pdl.py} \
        >"$out/pytest.log" 2>&1
      echo "tests rc=$? $((SECONDS - t0)) s: $(grep -cE '(^| )PASSED' "$out/pytest.log") passed, \
$(grep -cE '(^| )(FAILED|ERROR)( |$)' "$out/pytest.log") failed"
      grep -E "FAILED|Error" "$out/pytest.log" | head -20 ;;
    gputests) t0=$SECONDS  # every GPU-marked test (multi-GPU ones skip on one GPU): parity with every kernel on
      if ls .whl/*.whl >/dev/null 2>&1; then  # the server tests' packages, carried (scripts/fetch_serve_wheels.sh)
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
      fi
      timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rs -k "not builtin and not gguf" \
        tests >"$out/pytest-gpu.log" 2>&1
      echo "gputests rc=$? $((SECONDS - t0)) s: $(tail -1 "$out/pytest-gpu.log")"
      grep -E "^FAILED|^ERROR" "$out/pytest-gpu.log" | head -20 ;;
    prefill) for q in bf16 fp8; do  # one prompt's prefill: host launch time against GPU time
        quant=(); [ $q = fp8 ] && quant=(--quantization fp8)
        timeout 120 python3 scripts/profile_prefill.py "${quant[@]}" --input-len ${PREFILL_LEN:-128} --top 20 \
          >"$out/prefill-$q.txt" 2>&1; echo "prefill $q rc=$?"; grep -E "^prefill|^GPU" "$out/prefill-$q.txt"; done ;;
    attn) for fp16 in 0 1; do  # decode attention timing, the FP8 cache's products in bf16 then in fp16 (default)
        KILN_DECODE_FP8_AS_FP16=$fp16 timeout 120 python3 tests/kernels/perf_triton_attention.py \
          >"$out/attn-fp8-as-fp16-$fp16.txt" 2>&1; echo "attn KILN_DECODE_FP8_AS_FP16=$fp16 rc=$?"
        grep -A6 "float8" "$out/attn-fp8-as-fp16-$fp16.txt"; done ;;
    attnsweep) timeout ${PERF_TIMEOUT:-200} python3 tests/kernels/perf_triton_attention.py --sweep ${ATTN_SWEEP:-} \
      >"$out/attn-sweep.txt" 2>&1; echo "attnsweep rc=$?"; cat "$out/attn-sweep.txt" ;;
    perf) timeout ${PERF_TIMEOUT:-260} python3 tests/kernels/perf_quantized_gemm.py --sweep ${SWEEP:-} 2>&1 | tee "$out/perf.txt" \
      | grep -v "OutOfResources" ;;
    dense) timeout ${PERF_TIMEOUT:-200} python3 tests/kernels/perf_dense_gemv.py --sweep ${DENSE_ARGS:-} 2>&1 | tee "$out/dense.txt" \
      | grep -v "OutOfResources" ;;
    latency) for run in ${LATENCY:-bf16 bf16-nopdl bf16-cublas bf16-merge fp8 fp8-nopdl fp8-merge int4-awq}; do
        q=${run%%-cublas}; q=${q%%-merge}; q=${q%%-scaled-mm}; q=${q%%-nopdl}; q=${q%%-bytes}; q=${q%%-half2}; q=${q%%-words}; q=${q%%-silu}; q=${q%%-rows}; q=${q%%-rope}
        quant=(); [ "$q" != bf16 ] && quant=(--dummy-quantization "$q")
        ( # the A/B switches (docs/bench.md, "Settings that change the numbers"), for this run only
          case $run in *-cublas) export KILN_DISABLE_DENSE_GEMV=1 ;; *-merge) export KILN_DECODE_MERGE_IN_KERNEL=1 ;;
            *-scaled-mm) export KILN_DISABLE_FP8_GEMV=1 ;; *-nopdl) export KILN_DISABLE_PDL=1 ;;
            *-bytes) export KILN_INT4_GEMV_UNPACK=floats ;; *-half2) export KILN_INT4_GEMV_UNPACK=half2 ;;
            *-words) export KILN_INT4_GEMV_UNPACK=words ;; *-silu) export KILN_FUSE_SILU_INTO_GEMV=1 ;;
            *-rows) export KILN_GEMV_TILE_BY_ROWS=1 ;; *-rope) export KILN_FUSE_ROTARY_INTO_KV_STORE=1 ;; esac
          bench "latency-$run" latency x "${common[@]}" "${quant[@]}" --batch-size 1 --num-requests 3 \
            --input-len 128 --output-len 256 )
      done ;;
    rows) for size in 2 4; do for few in floats half2; do  # int4 decode at 2 and 4 sequences: the 2-4 row GEMV loops
        KILN_INT4_GEMV_FEW_ROWS=$few bench "latency-int4-awq-b$size-$few" latency x "${common[@]}" \
          --dummy-quantization int4-awq --batch-size $size --num-requests $((3 * size)) --input-len 128 --output-len 256
      done; done ;;
    profile) timeout 120 python3 scripts/profile_engine.py --quantization fp8 --num-requests 1 --output-len 256 \
      --top 12 >"$out/profile-fp8-b1.txt" 2>&1; echo "profile rc=$?"; sed -n "/decode steps:/,\$p" "$out/profile-fp8-b1.txt" | cut -c1-160 | head -30 ;;
    short) for q in ${QUANTS:-bf16 fp8}; do
        quant=(); [ $q != bf16 ] && quant=(--dummy-quantization $q)
        BENCH_TIMEOUT=150 bench "tp128-$q-8192" throughput x "${common[@]}" "${quant[@]}" --max-batch-size 1024 --num-requests 8192 \
          --input-len 128 --output-len 128; done ;;
    long) for q in ${QUANTS:-bf16 fp8}; do  # the engine's default batch: at 1,024 the KV cache holds < half at full length
        quant=(); [ $q != bf16 ] && quant=(--dummy-quantization $q)
        BENCH_TIMEOUT=${LONG_TIMEOUT:-300} bench "tp1000-$q-2048" throughput x "${common[@]}" "${quant[@]}" --num-requests 2048 \
          --input-len 1000 --output-len 1000; done ;;
    hf) BENCH_TIMEOUT=200 bench tp128-vs-hf throughput x "${common[@]}" --backend hf --hf-batch-size 256 \
        --num-requests 512 --input-len 128 --output-len 128 ;;
    start) t0=$SECONDS  # process start to first token of engines on local disk, bf16 / fp8 / int4-awq
      timeout ${START_TIMEOUT:-420} python3 scripts/start_to_first_token.py --make-dummy /tmp/kiln-start \
        --preset llama-3-8b --quantizations ${START_QUANTS:-fp8 int4-awq} --repeat ${START_REPEAT:-2} \
        ${START_EXPLAIN:+--explain} >"$out/start.txt" 2>&1  # START_EXPLAIN=1: kernel loads, warm-up, KILN_WARM_UP=0
      echo "start rc=$? $((SECONDS - t0)) s"; grep -E "built in|median|kernel|KILN_WARM_UP" "$out/start.txt" ;;
    batch) for q in bf16 fp8; do for size in 256 1024; do
        quant=(); [ $q != bf16 ] && quant=(--dummy-quantization $q)
        bench "tp128-$q-b$size" throughput x "${common[@]}" "${quant[@]}" --max-batch-size $size \
          --num-requests ${SHORT_N:-2048} --input-len 128 --output-len 128; done; done ;;
  esac
done
python3 scripts/summarize_bench.py "$out"
