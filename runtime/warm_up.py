"""A CUDA engine's first generations, run at start so that no user request pays for kernel compilation.

Triton compiles each kernel variant on first use (~0.1-1 s each on an empty cache). Decode-graph capture
compiles the decode path at start; the prefill path (the 16- and 64-query prefill attention tiles, the
rotary and KV-store kernels at prefill shapes, sampling) compiled on a server's first requests: two
steps of 430-600 ms on an H200 (docs/benchmarks.md, round 8). So the warm-up covers what serving runs:
greedy and random sampling, and a step that mixes one request's decode with another's prefill. An engine
from `kiln build` ships those kernels in its cache, so there this costs ~0.1 s of start and compiles nothing.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import SchedulerStats

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine

logger = logging.getLogger(__name__)

WARM_UP_TOKENS = 4  # generated per warm-up prompt: a prefill step, then decode steps
LONG_PROMPT_LENGTH = 80  # > 16 new tokens: the prefill attention's 64-query tiles (<= 16: its 16-query tiles)


def warm_up_prompts(max_seq_len: int) -> list[list[int]]:
    """A 4-token prompt and, where max_seq_len allows, an 80-token one (token ids 1-4: in any vocabulary)."""
    if max_seq_len < 4 + WARM_UP_TOKENS:
        return []
    long_length = min(LONG_PROMPT_LENGTH, max_seq_len - WARM_UP_TOKENS)
    lengths = (4, long_length) if long_length > 16 else (4,)
    return [([1, 2, 3, 4] * (length // 4 + 1))[:length] for length in lengths]


def warm_up_wanted(device_type: str) -> bool:
    """On CUDA (the only place kernels compile), unless KILN_WARM_UP=0."""
    return device_type == "cuda" and os.environ.get("KILN_WARM_UP") != "0"


def warm_up(engine: LLMEngine) -> None:
    """Generate from the warm-up prompts and leave no trace in the engine's state.

    The first prompt samples greedily, the second at temperature 1 (the sampler's two paths); the second
    arrives after the first's prefill was launched, so the step after mixes a decode with a prefill.
    With CUDA graphs for steps with prompt tokens (runtime/mixed_graphs.py) those steps replay graphs, so
    the prompts run a second time with the graphs set aside: a step too large for them (two 1,000-token
    prompts that arrive together) runs eagerly, and its kernels compiled on a server's first such step, a
    ~1.1 s stall on an H200 (docs/benchmarks.md, round 10). Explicit request ids and seeds: the engine's id
    counter and seed stream are untouched, so the requests that follow get the ids and samples they get
    without a warm-up. The step and prefix-cache counters start again from zero, and the prefix cache
    forgets the warm-up prompts.
    """
    started = time.perf_counter()
    prompts = warm_up_prompts(engine.limits.max_seq_len)
    runner = engine.runner
    graphs = runner.mixed_graphs
    passes = ("graphs", "eager") if graphs is not None else ("eager",)
    try:
        for name in passes:
            runner.mixed_graphs = graphs if name == "graphs" else None
            _generate(engine, prompts, name)
            # Each pass computes its prompts in full: from the cache, the second would compute 16 tokens of the
            # 80-token prompt, a step of 16-query tiles, and the kernel variant of 64-query ones would compile
            # while serving (it did, on an H200: round 10).
            engine.kv_cache.reset_prefix_cache()  # its hit counters too
    finally:
        runner.mixed_graphs = graphs
    engine.scheduler.stats = SchedulerStats()
    logger.info(
        "warm-up: %d prompt(s) generated %d time(s) in %.2f s (KILN_WARM_UP=0 skips it)",
        len(prompts),
        len(passes),
        time.perf_counter() - started,
    )


def _generate(engine: LLMEngine, prompts: list[list[int]], name: str) -> None:
    greedy = SamplingParams(max_tokens=WARM_UP_TOKENS, temperature=0.0, ignore_eos=True, seed=0)
    sampled = SamplingParams(max_tokens=WARM_UP_TOKENS, temperature=1.0, ignore_eos=True, seed=0)
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, (greedy, sampled)[index % 2], request_id=f"kiln-warm-up-{name}-{index}")
        engine.step()
    while engine.has_unfinished:
        engine.step()
