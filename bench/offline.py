"""Offline runs through the engine in this process: throughput (everything at once) and latency (fixed batches).

Token arrival times are taken after each engine step (the step's outputs are on the host by then),
so TTFT, TPOT and ITL here are what a caller of the engine sees, without HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kiln.bench.metrics import RequestTrace
from kiln.bench.workload import BenchRequest
from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import RequestOutputKind
from kiln.runtime.sampling_params import SamplingParams

Progress = Callable[[int], None]  # called with the number of requests just finished


def _params(request: BenchRequest, ignore_eos: bool) -> SamplingParams:
    # Sampling as vLLM's benchmarks: temperature 1, no truncation; the seed keeps runs repeatable. Each
    # step's output carries only its new tokens (all the timing needs), not a copy of everything so far.
    return SamplingParams(
        max_tokens=request.output_len,
        ignore_eos=ignore_eos,
        temperature=1.0,
        seed=0,
        output_kind=RequestOutputKind.DELTA,
    )


def run_batch(
    engine: LLMEngine, requests: list[BenchRequest], ignore_eos: bool, progress: Progress | None = None
) -> list[RequestTrace]:
    """Submit all requests at once, step until they finish; one trace per request, in input order."""
    starts: dict[str, float] = {}
    token_times: dict[str, list[float]] = {}
    ends: dict[str, float] = {}
    ids = []
    for request in requests:
        request_id = engine.add_request(list(request.prompt_token_ids), _params(request, ignore_eos))
        starts[request_id] = time.perf_counter()
        token_times[request_id] = []
        ids.append(request_id)
    while engine.has_unfinished:
        outputs = engine.step()
        now = time.perf_counter()
        finished = 0
        for output in outputs:
            times = token_times[output.request_id]
            times.extend([now] * len(output.outputs[0].token_ids))
            if output.finished:
                ends[output.request_id] = now
                finished += 1
        if progress is not None and finished:
            progress(finished)
    return [
        RequestTrace(starts[i], tuple(token_times[i]), ends[i], len(r.prompt_token_ids)) for i, r in zip(ids, requests)
    ]


def run_throughput(
    engine: LLMEngine, requests: list[BenchRequest], ignore_eos: bool, progress: Progress | None = None
) -> list[RequestTrace]:
    """Everything submitted at once: the engine's continuous batching decides the rest."""
    return run_batch(engine, requests, ignore_eos, progress)


def run_latency(
    engine: LLMEngine, requests: list[BenchRequest], batch_size: int, ignore_eos: bool, progress: Progress | None = None
) -> list[RequestTrace]:
    """Fixed batches of `batch_size`, one after the other (batch 1 = single-stream latency)."""
    traces: list[RequestTrace] = []
    for first in range(0, len(requests), batch_size):
        traces += run_batch(engine, requests[first : first + batch_size], ignore_eos, progress)
    return traces
