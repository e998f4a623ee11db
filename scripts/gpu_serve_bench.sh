#!/usr/bin/env bash
# Issue 8's serving row on a device machine: `kiln serve` (Llama-3-8B shape, random weights) and
# `kiln bench serve` against it with Poisson arrivals, 1000-token prompts and 200-token outputs.
# The image lacks fastapi, uvicorn, pydantic and openai: `bash scripts/fetch_serve_wheels.sh` here first,
# then name `.whl` in the device call's carry.
#   OUT=/tmp/s bash scripts/gpu_serve_bench.sh [bf16] [fp8]       RATE (2), NUM (120) override the load
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/kiln-serve-bench
source scripts/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried wheels"; exit 1; }
export PYTHONPATH="$PYTHONPATH:/tmp/site"  # kiln first, then the carried packages
port=8017
for quant in ${*:-bf16 fp8}; do
  quant_args=(); [ "$quant" != bf16 ] && quant_args=(--dummy-quantization "$quant")
  python3 -m kiln.cli.main serve x --dummy-weights --preset llama-3-8b "${quant_args[@]}" --port $port \
    --served-model-name llama >"$out/serve-$quant.log" 2>&1 &
  server=$!
  for _ in $(seq 180); do  # up to 90 s for the engine to load, plan its cache and capture graphs
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health')" 2>/dev/null && break
    sleep 0.5
  done
  t0=$SECONDS
  timeout ${BENCH_TIMEOUT:-200} python3 -m kiln.cli.main bench serve --url "http://127.0.0.1:$port" \
    --request-rate ${RATE:-2} --concurrency 0 --num-requests ${NUM:-120} --input-len 1000 --output-len 200 \
    --vocab-size 128256 --json -o "$out/serve-bench-$quant" --force >"$out/serve-bench-$quant.json" \
    2>"$out/serve-bench-$quant.log"
  echo "serve-bench-$quant rc=$? $((SECONDS - t0)) s"
  # The server's own TTFT histogram (from the request's arrival to its first token): against the client's
  # TTFT it splits the time between the engine and the HTTP path.
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/metrics').read().decode())" \
    >"$out/metrics-$quant.txt" 2>&1
  grep -E "^kiln_time_to_first_token_seconds_(sum|count)" "$out/metrics-$quant.txt"
  kill -TERM $server; wait $server
done
python3 scripts/summarize_bench.py "$out"
