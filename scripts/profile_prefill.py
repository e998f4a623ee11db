"""Where a single prompt's prefill step spends its time: host launch work against GPU time.

A prefill runs eagerly (no CUDA graph), so each of its ~500 kernels costs a Python launch. This times one
engine step that prefills one prompt (`--input-len` tokens, random weights of `--preset`): the host time
to launch it, the time until the GPU is done, and the GPU kernels' own time (torch profiler); then the
host functions taking the most time (cProfile). Issue 8: batch-1 TTFT, and the serve row's TTFT.

    python scripts/profile_prefill.py --preset llama-3-8b --quantization fp8 --input-len 128
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time

import torch

from kiln.bench.runner import open_engine
from kiln.runtime.sampling_params import SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prefill_once(engine, prompt: list[int]) -> tuple[float, float]:
    """(host ms to launch the step, ms until the GPU finished it) for one prompt's prefill."""
    engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    _sync()
    started = time.perf_counter()
    engine.step()  # launches the prefill (async scheduling reads it back on the next call)
    launched = time.perf_counter()
    _sync()
    done = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    return 1000 * (launched - started), 1000 * (done - started)


def _gpu_time(engine, prompts: list[list[int]]) -> None:
    """The GPU kernels' own time per prefill step, and their number."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for prompt in prompts:
            _prefill_once(engine, prompt)
    events = [event for event in prof.key_averages() if event.self_device_time_total > 0]
    kernels_ms = sum(event.self_device_time_total for event in events) / 1000 / len(prompts)
    launches = sum(event.count for event in events) / len(prompts)
    print(f"GPU kernels {kernels_ms:.1f} ms and ~{launches:.0f} kernels a prefill (with the step reading it back)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--quantization", default=None, help="fp8 or int4-awq dummy weights")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    engine, _ = open_engine(args.preset, {}, args.preset, args.quantization)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(3 * args.repeat + 2)]
    for prompt in prompts[:2]:  # warm-up: compiles what this length needs
        _prefill_once(engine, prompt)
    times = [_prefill_once(engine, prompt) for prompt in prompts[2 : 2 + args.repeat]]
    launch = sorted(t[0] for t in times)[len(times) // 2]
    total = sorted(t[1] for t in times)[len(times) // 2]
    print(f"prefill of {args.input_len} tokens ({args.quantization or 'bf16'}): host launch {launch:.1f} ms, "
          f"done after {total:.1f} ms (medians of {len(times)})")  # fmt: skip

    if torch.cuda.is_available():
        _gpu_time(engine, prompts[2 + args.repeat : 2 + 2 * args.repeat])
    profiler = cProfile.Profile()
    profiler.enable()
    for prompt in prompts[2 + 2 * args.repeat :]:
        _prefill_once(engine, prompt)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    engine.shutdown()


if __name__ == "__main__":
    main()
