#!/usr/bin/env bash
# Issue 8's serving row on a device machine: `kiln serve` (Llama-3-8B shape, random weights) and
# `kiln bench serve` against it with Poisson arrivals, 1000-token prompts and 200-token outputs.
# The image lacks fastapi, uvicorn, pydantic and openai: `bash scripts/fetch_serve_wheels.sh` here first,
# then name `.whl` in the device call's carry.
#   OUT=/tmp/s bash scripts/gpu_serve_bench.sh [bf16] [fp8] [bf16-sync]     RATE (2), NUM (120) override the load
# A -sync suffix serves with KILN_DISABLE_ASYNC_SCHEDULING=1 (each step read back before the next is launched),
# -gil5 with CPython's default GIL switch interval of 5 ms (KILN_GIL_SWITCH_INTERVAL_MS=5; serve/gil_switch.py),
# -nopace launching each step at once (KILN_PACE_LAUNCHES=0; serve/launch_pacing.py), -nograph running steps with
# prompt tokens eagerly (KILN_MIXED_STEP_GRAPHS=0; runtime/mixed_graphs.py). Suffixes combine: bf16-nopace-gil5.
# CLIENTS="http openai" runs `bench serve` once per client against each server (reports serve-bench-RUN-CLIENT).
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/kiln-serve-bench
source scripts/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried wheels"; exit 1; }
export PYTHONPATH="$PYTHONPATH:/tmp/site"  # kiln first, then the carried packages
port=8017
for run in ${*:-bf16 fp8}; do
  quant=$run; for suffix in -sync -gil5 -nopace -nograph; do quant=${quant//$suffix/}; done  # int4-awq stays whole
  quant_args=(); [ "$quant" != bf16 ] && quant_args=(--dummy-quantization "$quant")
  sync=0; [[ $run == *-sync* ]] && sync=1
  gil=; [[ $run == *-gil5* ]] && gil=5
  pace=1; [[ $run == *-nopace* ]] && pace=0
  graphs=1; [[ $run == *-nograph* ]] && graphs=0
  KILN_MIXED_STEP_GRAPHS=$graphs KILN_PACE_LAUNCHES=$pace KILN_GIL_SWITCH_INTERVAL_MS=$gil KILN_DISABLE_ASYNC_SCHEDULING=$sync python3 -m kiln.cli.main serve x --dummy-weights --preset llama-3-8b "${quant_args[@]}" --port $port \
    --served-model-name llama >"$out/serve-$run.log" 2>&1 &
  server=$!
  for _ in $(seq 180); do  # up to 90 s for the engine to load, plan its cache and capture graphs
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health')" 2>/dev/null && break
    sleep 0.5
  done
  seed=0
  for client in ${CLIENTS:-http}; do  # each client's run against the same server (bench serve --client), each
    # with its own seed: the same prompts again would come from the server's prefix cache
    name=serve-bench-$run; [ -n "${CLIENTS:-}" ] && name=$name-$client
    t0=$SECONDS
    timeout ${BENCH_TIMEOUT:-200} python3 -m kiln.cli.main bench serve --url "http://127.0.0.1:$port" \
      --request-rate ${RATE:-2} --concurrency 0 --num-requests ${NUM:-120} --input-len 1000 --output-len 200 \
      --vocab-size 128256 --client $client --seed $seed --json -o "$out/$name" --force >"$out/$name.json" \
      2>"$out/$name.log"
    echo "$name rc=$? $((SECONDS - t0)) s"
    seed=$((seed + 1))
  done
  # The server's own TTFT and its two parts, queue and prefill (arrival in the HTTP handler to first token):
  # against the client's TTFT it splits the time between the engine and the HTTP path.
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/metrics').read().decode())" \
    >"$out/metrics-$run.txt" 2>&1
  grep -E "^kiln_(time_to_first_token|request_queue_time|request_prefill_time)_seconds_(sum|count)" "$out/metrics-$run.txt"
  kill -TERM $server; wait $server
done
python3 scripts/summarize_bench.py "$out"
