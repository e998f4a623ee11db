"""Load against a running OpenAI-compatible server: fixed concurrency or Poisson arrivals, streamed completions.

Each request sends its prompt as token ids to /v1/completions with `stream`, `max_tokens`,
`ignore_eos`, `stream_options.include_usage` and `return_token_ids` (vLLM's extension), and records when
every chunk arrived. A chunk counts as many tokens as its `token_ids` hold; from a server that ignores
return_token_ids, a chunk with text counts as one token. When the final usage reports more completion
tokens than were counted (a server that batches tokens into chunks), the extra tokens are counted at the
last chunk's time.

Two clients send the same JSON body: `http` (the default) reads the SSE lines with aiohttp, as vLLM's
benchmark does; `openai` goes through the official SDK, which spends more of the client's CPU per request
and per chunk (on a 2-core CPU, 1.5 ms of its own before sending and ~0.4 ms parsing each chunk), time that
lands in TTFT and ITL without being the server's.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable

from kiln.bench.metrics import RequestTrace
from kiln.bench.workload import BenchRequest
from kiln.core.errors import UserInputError


def _chunk_tokens(token_ids: list | None, text: str | None) -> int:
    """Tokens a streamed choice carries: its `token_ids` where the server returns them (kiln and vLLM with
    return_token_ids; also counts tokens whose text is empty), else one per chunk with text."""
    if token_ids is not None:
        return len(token_ids)
    return 1 if text else 0


CLIENTS = ("http", "openai")


def _body(model: str, request: BenchRequest, ignore_eos: bool) -> dict:
    return {
        "model": model, "prompt": list(request.prompt_token_ids), "max_tokens": request.output_len, "stream": True,
        "temperature": 1.0, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
        "return_token_ids": True,
    }  # fmt: skip


def _finish(start: float, times: list[float], reported: int | None, request: BenchRequest, responded) -> RequestTrace:
    end = time.perf_counter()
    if reported is not None and reported > len(times) and times:
        times += [times[-1]] * (reported - len(times))
    return RequestTrace(start, tuple(times), end, len(request.prompt_token_ids), response_time=responded)


async def _one_http(session, url: str, model: str, request: BenchRequest, ignore_eos: bool) -> RequestTrace:
    """One streamed completion through aiohttp: SSE `data:` lines, parsed as they arrive."""
    start = time.perf_counter()
    times: list[float] = []
    reported = None
    responded = None
    try:
        async with session.post(url + "/v1/completions", json=_body(model, request, ignore_eos)) as response:
            responded = time.perf_counter()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:500]}")
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue  # the blank line between events
                now = time.perf_counter()
                if line.startswith(b"data: [DONE]"):
                    break
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    choice = chunk["choices"][0]
                    times += [now] * _chunk_tokens(choice.get("token_ids"), choice.get("text"))
                if chunk.get("usage"):
                    reported = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
        return RequestTrace(
            start, tuple(times), time.perf_counter(), len(request.prompt_token_ids), False, str(exc), responded
        )
    return _finish(start, times, reported, request, responded)


async def _one_openai(client, model: str, request: BenchRequest, ignore_eos: bool) -> RequestTrace:
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
                choice = chunk.choices[0]
                times += [now] * _chunk_tokens(getattr(choice, "token_ids", None), choice.text)
            if chunk.usage is not None:
                reported = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
        return RequestTrace(
            start, tuple(times), time.perf_counter(), len(request.prompt_token_ids), False, str(exc), responded
        )
    return _finish(start, times, reported, request, responded)


async def run_load(
    url: str, model: str, requests: list[BenchRequest], *, concurrency: int | None, request_rate: float | None,
    ignore_eos: bool, seed: int, api_key: str = "none", progress: Callable[[int], None] | None = None,
    client: str = "http",
) -> list[RequestTrace]:  # fmt: skip
    """Send every request; at most `concurrency` in flight, arrivals Poisson at `request_rate` per second."""
    url = url.rstrip("/")
    if client == "openai":
        from openai import AsyncOpenAI

        sdk = AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=3600)
        send: Callable[[BenchRequest], Awaitable[RequestTrace]] = lambda r: _one_openai(sdk, model, r, ignore_eos)  # noqa: E731
        close = sdk.close
    else:
        try:
            import aiohttp
        except ImportError as exc:  # a dependency of kiln, but an environment may lack it
            raise UserInputError("--client http needs aiohttp (pip install aiohttp), or use --client openai") from exc

        session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=aiohttp.ClientTimeout(total=3600),
            connector=aiohttp.TCPConnector(limit=0),  # no pool cap: concurrency is the semaphore's
        )
        send = lambda r: _one_http(session, url, model, r, ignore_eos)  # noqa: E731
        close = session.close
    limit = asyncio.Semaphore(concurrency or len(requests))
    rng = random.Random(seed)

    async def limited(request: BenchRequest) -> RequestTrace:
        async with limit:
            trace = await send(request)
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
        await close()
