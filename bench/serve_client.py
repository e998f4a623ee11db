"""Load against a running OpenAI-compatible server: fixed concurrency or Poisson arrivals, streamed completions.

Each request sends its prompt as token ids to /v1/completions with `stream`, `max_tokens`,
`ignore_eos`, `stream_options.include_usage` and `return_token_ids` (vLLM's extension), and records when
every chunk arrived. A chunk counts as many tokens as its `token_ids` hold; from a server that ignores
return_token_ids, a chunk with text counts as one token. When the final usage reports more completion
tokens than were counted (a server that batches tokens into chunks), the extra tokens are counted at the
last chunk's time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from kiln.bench.metrics import RequestTrace
from kiln.bench.workload import BenchRequest


def _chunk_tokens(choice) -> int:
    """Tokens a streamed choice carries: its `token_ids` where the server returns them (kiln and vLLM with
    return_token_ids; also counts tokens whose text is empty), else one per chunk with text."""
    token_ids = getattr(choice, "token_ids", None)
    if token_ids is not None:
        return len(token_ids)
    return 1 if choice.text else 0


async def _one(client, model: str, request: BenchRequest, ignore_eos: bool) -> RequestTrace:
    start = time.perf_counter()
    times: list[float] = []
    reported = None
    responded = None
    try:
        # The token ids go in extra_body, which the client sends as is: as `prompt=` it walks every id through
        # its parameter transform first, ~16 ms for 1,000 tokens (2-core CPU), counted in TTFT and holding up
        # the other streams' chunks on this event loop. The server receives the same JSON body.
        stream = await client.completions.create(
            model=model, prompt="", max_tokens=request.output_len, stream=True,
            temperature=1.0, stream_options={"include_usage": True},
            extra_body={"prompt": list(request.prompt_token_ids), "ignore_eos": ignore_eos, "return_token_ids": True},
        )  # fmt: skip
        responded = time.perf_counter()  # the server sent its headers: the request reached the engine
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                times += [now] * _chunk_tokens(chunk.choices[0])
            if chunk.usage is not None:
                reported = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
        return RequestTrace(
            start, tuple(times), time.perf_counter(), len(request.prompt_token_ids), False, str(exc), responded
        )
    end = time.perf_counter()
    if reported is not None and reported > len(times) and times:
        times += [times[-1]] * (reported - len(times))
    return RequestTrace(start, tuple(times), end, len(request.prompt_token_ids), response_time=responded)


async def run_load(
    url: str, model: str, requests: list[BenchRequest], *, concurrency: int | None, request_rate: float | None,
    ignore_eos: bool, seed: int, api_key: str = "none", progress: Callable[[int], None] | None = None,
) -> list[RequestTrace]:  # fmt: skip
    """Send every request; at most `concurrency` in flight, arrivals Poisson at `request_rate` per second."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=3600)
    limit = asyncio.Semaphore(concurrency or len(requests))
    rng = random.Random(seed)

    async def limited(request: BenchRequest) -> RequestTrace:
        async with limit:
            trace = await _one(client, model, request, ignore_eos)
        if progress is not None:
            progress(1)
        return trace

    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(limited(request)))
        if request_rate:  # exponential gaps: a Poisson process at request_rate
            await asyncio.sleep(rng.expovariate(request_rate))
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await client.close()
