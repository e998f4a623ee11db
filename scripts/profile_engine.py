"""Where an engine step spends its time: host work (cProfile) and GPU kernels (torch profiler).

Runs `--num-requests` random prompts through the engine with random weights (`--preset`), like
`kiln bench throughput`, and prints: output tok/s, steps and mean step time; the host functions that
take the most time (waiting for the sampled tokens, `Event.synchronize`, is where the host waits for
the GPU; with async scheduling the rest overlaps the GPU's next step); then the GPU kernels of a window of decode
steps. Used to decide what issue 8's optimisations target; the numbers that count come from
`kiln bench`.

    python scripts/profile_engine.py --preset llama-3-8b --num-requests 256 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch
from trace_kernels import table, take_apart  # this folder's module (the script's folder is on sys.path)

from kiln.bench.offline import run_throughput
from kiln.bench.runner import open_engine
from kiln.bench.workload import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--quantization", default=None, help="fp8 or int4-awq dummy weights")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs (rank 0 is profiled)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", default=None, help="write a Chrome trace of the profiled decode steps here")
    args = parser.parse_args()

    options = {"max_batch_size": args.max_batch_size} if args.max_batch_size else {}
    options["tp_size"] = args.tp_size
    started = time.perf_counter()
    engine, _ = open_engine(args.preset, options, args.preset, args.quantization)
    print(f"engine ready in {time.perf_counter() - started:.1f} s")
    vocab = engine.model_config.vocab_size
    warm = synthetic(8, args.input_len, 8, vocab, seed=1).requests
    run_throughput(engine, list(warm), ignore_eos=True)
    requests = list(synthetic(args.num_requests, args.input_len, args.output_len, vocab, seed=0).requests)

    steps = _count_steps(engine)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    traces = run_throughput(engine, requests, ignore_eos=True)
    profiler.disable()
    seconds = time.perf_counter() - started
    output_tokens = sum(len(trace.token_times) for trace in traces)
    print(
        f"\n{len(requests)} requests, {output_tokens} output tokens in {seconds:.2f} s: "
        f"{output_tokens / seconds:,.0f} output tok/s; {steps[0]} steps, "
        f"{1000 * seconds / max(steps[0], 1):.2f} ms/step"
    )
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(args.top)
    print(text.getvalue())

    if torch.cuda.is_available():
        _profile_decode_window(engine, requests[: args.max_batch_size or 256], args)
    engine.shutdown()


def _count_steps(engine) -> list[int]:
    """Wraps engine.step to count calls; returns the one-element counter."""
    counter = [0]
    step = engine.step

    def counted():
        counter[0] += 1
        return step()

    engine.step = counted
    return counter


def _profile_decode_window(engine, requests, args) -> None:
    """GPU kernels of ~20 decode steps at full batch, after the prompts are in."""
    from torch.profiler import ProfilerActivity, profile

    from kiln.bench.offline import _params

    for request in requests:
        engine.add_request(list(request.prompt_token_ids), _params(request, True))
    prompt_tokens = sum(len(request.prompt_token_ids) for request in requests)
    for _ in range(-(-prompt_tokens // engine.limits.max_num_tokens) + 8):  # the prompts' steps, then decode
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - started)
    kernels_ms = sum(event.self_device_time_total for event in prof.key_averages()) / 1000
    # Under the profiler; the GPU busy share says how much of a step the host still adds in series.
    print(f"20 decode steps: {wall_ms / 20:.2f} ms a step, GPU kernels {kernels_ms / 20:.2f} ms a step "
          f"({kernels_ms / wall_ms:.0%} busy)")  # fmt: skip
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))
    trace = Path(args.trace) if args.trace else Path(tempfile.mkdtemp()) / "decode-steps.json"
    prof.export_chrome_trace(str(trace))
    # With PDL the table above counts each kernel's wait for the one before it; this one does not.
    print(table(take_apart(json.loads(trace.read_text())["traceEvents"]), steps=20, top=args.top))
    while engine.has_unfinished:
        engine.step()


if __name__ == "__main__":
    main()
