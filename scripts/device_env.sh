# Sourced by the scripts/gpu_*.sh scripts on a device machine (its python has torch, triton and
# transformers): makes the repository root importable as `kiln`, turns NVLink multicast off (the
# machines' rule) and creates the results folder $out (from $OUT, else the caller's default in $out).
out=${OUT:-$out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/kiln"  # the repo root is the `kiln` package
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
