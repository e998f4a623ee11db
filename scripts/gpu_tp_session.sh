#!/usr/bin/env bash
# One device call for issue 9 on 2+ GPUs: TP tests and latency (gpu_tp_check.sh), all-reduce latency
# (ALLREDUCE=1) and batch-1 decode profiles (PROFILE_TP="1 2"). Everything lands in $OUT (default /tmp/kiln-tp).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kiln-tp}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/kiln"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${ALLREDUCE:-}" ]; then
  timeout 120 torchrun --nproc-per-node 2 scripts/allreduce_latency.py >"$out/allreduce.txt" 2>&1
  echo "allreduce rc=$?"; grep batch "$out/allreduce.txt"
fi
for tp in ${PROFILE_TP:-}; do
  timeout 200 python3 scripts/profile_engine.py --num-requests 1 --output-len 256 --max-batch-size 1 \
    --tp-size "$tp" --top 30 >"$out/profile-b1-tp$tp.txt" 2>&1
  echo "profile tp$tp rc=$? $(grep 'output tok/s' "$out/profile-b1-tp$tp.txt")"
done
OUT="$out" bash scripts/gpu_tp_check.sh "$@"
