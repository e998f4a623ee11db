# Sourced by the scripts/gpu_*.sh scripts on a device machine (its python has torch, triton and
# transformers): makes the repository root importable as `kiln`, turns NVLink multicast off (the
# machines' rule), creates the results folder $out (from $OUT, else the caller's default in $out) and
# defines `bench NAME ARGS...`: one `kiln bench` run, its JSON and log in $out (BENCH_TIMEOUT, 120 s).
out=${OUT:-$out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/kiln"  # the repo root is the `kiln` package
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

bench() {  # name, then kiln bench args (env vars set by the caller apply)
  local name=$1; shift
  local t0=$SECONDS
  timeout ${BENCH_TIMEOUT:-120} python3 -m kiln.cli.main bench "$@" -o "$out/$name" --force \
    >"$out/$name.json" 2>"$out/$name.log"
  echo "$name rc=$? $((SECONDS - t0)) s"
}
