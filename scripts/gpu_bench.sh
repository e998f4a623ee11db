#!/usr/bin/env bash
# Issue 8's workloads with `kiln bench` on the device machine (its python has torch/triton/transformers;
# the repo root is put on PYTHONPATH as `kiln`). Reports and logs go to $OUT; a summary table is printed last.
#   bash scripts/gpu_bench.sh [quick|full] [step...]
# steps: latency throughput long hf profile (default: all but profile). quick runs fewer requests;
# SHORT_N / LONG_N / HF_N override the request counts, BENCH_ARGS adds options to every run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kiln-gpu-bench}
mkdir -p "$out"
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/kiln"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mode=${1:-quick}
shift || true
steps=${*:-latency throughput long hf}
kiln() { python3 -m kiln.cli.main "$@"; }
if [ "$mode" = full ]; then short_n=8192; long_n=2048; hf_n=1024; else short_n=2048; long_n=256; hf_n=512; fi
short_n=${SHORT_N:-$short_n} long_n=${LONG_N:-$long_n} hf_n=${HF_N:-$hf_n}  # overrides, e.g. to fit a time budget
extra=(${BENCH_ARGS:-})  # extra `kiln bench` options for every run, e.g. BENCH_ARGS="--max-batch-size 512"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/versions.txt"
common=(--dummy-weights --preset llama-3-8b --ignore-eos --json)
quants=("" fp8 int4-awq)
bench() {  # name, then kiln bench args; the JSON result lands in $out/name.json
  local name=$1; shift
  local t0=$SECONDS
  kiln bench "$@" "${extra[@]}" -o "$out/$name" --force >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$? $((SECONDS - t0)) s"
}
for step in $steps; do
  case $step in
    latency) for q in "${quants[@]}"; do
        bench "latency-${q:-bf16}" latency x "${common[@]}" ${q:+--dummy-quantization $q} \
          --batch-size 1 --num-requests 3 --input-len 128 --output-len 256; done ;;
    throughput) for q in "${quants[@]}"; do
        bench "tp128-${q:-bf16}" throughput x "${common[@]}" ${q:+--dummy-quantization $q} \
          --num-requests $short_n --input-len 128 --output-len 128; done ;;
    long) for q in "" fp8; do
        bench "tp1000-${q:-bf16}" throughput x "${common[@]}" ${q:+--dummy-quantization $q} \
          --num-requests $long_n --input-len 1000 --output-len 1000; done ;;
    hf) bench "hf128" throughput x "${common[@]}" --backend hf --hf-batch-size 256 \
          --num-requests $hf_n --input-len 128 --output-len 128 ;;
    profile) python3 scripts/profile_engine.py --preset llama-3-8b --num-requests 256 >"$out/profile-bf16.txt" 2>&1
        echo "profile rc=$?" ;;
  esac
done
python3 scripts/summarize_bench.py "$out"
