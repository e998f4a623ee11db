#!/usr/bin/env bash
# Issue 9 on a 4-GPU device machine: the multi-GPU tests on 2 GPUs (tests2: TP=2 and PP=2 against one GPU,
# PP=2 with each stage's decode graphs, a killed worker; the log searched for shutdown warnings) and on 4 (TP=2 x
# PP=2: tests4), batch-1 latency of the Llama-3-8B shape at TP=1, TP=2 and PP=2 (TP=2 again with the
# dense GEMV off and with PDL off), a TP=2 batch-1 profile, and `kiln bench throughput` of the
# Llama-3-70B shape at TP=4 and at TP=2 x PP=2 (70b). Results land in $OUT. Steps on 2 GPUs can run
# beside each other with CUDA_VISIBLE_DEVICES=0,1 and 2,3.
# peer: the fused all-reduce + norm kernel's tests (both protocols) and TP=2 batch-1 latency with it (flags, the
# default), with KILN_PEER_REDUCE=lamport, and with NCCL (KILN_DISABLE_PEER_ALL_REDUCE=1), against TP=1.
#   OUT=/tmp/r bash scripts/gpu_pipeline.sh [tests2] [latency] [peer] [profile] [tests4] [70b]
# TESTS2_ONLY="pipeline or killed" narrows tests2 (pytest -k).
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/kiln-pipeline
source scripts/device_env.sh
nvidia-smi topo -m >"$out/topology.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | tee -a "$out/versions.txt"
tests=tests/runtime/test_tensor_parallel_gpu.py
latency=(latency x --dummy-weights --preset llama-3-8b --ignore-eos --json --batch-size 1 --num-requests 3
  --input-len 128 --output-len 256)
pytest_step() {  # name, then test ids
  local name=$1; shift
  local t0=$SECONDS
  # faulthandler: a test still running after 200 s prints its threads' stacks (a hang shows where it waits)
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -v -p no:cacheprovider -rs -o faulthandler_timeout=200 "$@" >"$out/pytest-$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0)) s: $(tail -1 "$out/pytest-$name.log")"
  grep -E "PASSED|FAILED|ERROR" "$out/pytest-$name.log" | cut -c1-160 | head -10
  echo "warnings in the log: $(grep -ciE 'warn' "$out/pytest-$name.log")"; grep -iE 'warn' "$out/pytest-$name.log" | head -5
}
for step in ${*:-tests2 latency profile tests4 70b}; do
  case $step in
    tests2) pytest_step tests2 -m gpu "$tests" ${TESTS2_ONLY:+-k "$TESTS2_ONLY"} ;;  # 2-GPU tests (4-GPU ones skip)
    peer) pytest_step peer tests/kernels/test_peer_reduce.py
      CUDA_VISIBLE_DEVICES=0 bench latency-bf16-tp1 "${latency[@]}"
      bench latency-bf16-tp2 "${latency[@]}" --tp-size 2
      KILN_PEER_REDUCE=lamport bench latency-bf16-tp2-lamport "${latency[@]}" --tp-size 2
      KILN_DISABLE_PEER_ALL_REDUCE=1 bench latency-bf16-tp2-nccl "${latency[@]}" --tp-size 2 ;;
    tests4) pytest_step tests4 "$tests::test_gpu_pipeline_bf16_greedy_tokens_agree_with_one_gpu[tp2-pp2]" ;;
    latency)
      bench latency-bf16-tp1 "${latency[@]}"
      bench latency-bf16-tp2 "${latency[@]}" --tp-size 2
      KILN_DISABLE_DENSE_GEMV=1 bench latency-bf16-tp2-cublas "${latency[@]}" --tp-size 2
      KILN_DISABLE_PDL=1 bench latency-bf16-tp2-nopdl "${latency[@]}" --tp-size 2
      bench latency-bf16-pp2 "${latency[@]}" --pp-size 2 ;;
    profile) timeout 150 python3 scripts/profile_engine.py --num-requests 1 --output-len 256 --max-batch-size 1 \
        --tp-size 2 --top 30 >"$out/profile-b1-tp2.txt" 2>&1
      echo "profile tp2 rc=$? $(grep 'output tok/s' "$out/profile-b1-tp2.txt")" ;;
    70b) for layout in "--tp-size 4" "--tp-size 2 --pp-size 2"; do
        name="throughput-70b-bf16-$(echo "$layout" | tr -d ' -' | sed 's/size//g')"
        BENCH_TIMEOUT=${BIG_TIMEOUT:-170} bench "$name" throughput x --dummy-weights --preset llama-3-70b --ignore-eos \
          --json $layout --num-requests ${NUM_REQUESTS:-1024} --input-len 128 --output-len 128
      done ;;
  esac
done
python3 scripts/summarize_bench.py "$out"
