"""A submitted request's output stream (serve/async_engine.RequestStream): when it aborts the request."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

from kiln.serve.async_engine import RequestStream


def _stream(aborts: list[str]) -> tuple[RequestStream, asyncio.Queue]:
    sink: asyncio.Queue = asyncio.Queue()
    return RequestStream(sink, lambda: aborts.append("req-1")), sink


def test_a_stream_read_to_its_end_aborts_nothing() -> None:
    async def main() -> list:
        aborts: list[str] = []
        stream, sink = _stream(aborts)
        for finished in (False, False, True):
            sink.put_nowait(SimpleNamespace(finished=finished))
        outputs = [output async for output in stream]
        await stream.aclose()
        return [len(outputs), aborts]

    assert asyncio.run(main()) == [3, []]


def test_closing_early_aborts_once() -> None:
    async def main() -> list[str]:
        aborts: list[str] = []
        stream, sink = _stream(aborts)
        sink.put_nowait(SimpleNamespace(finished=False))
        assert not (await stream.__anext__()).finished
        await stream.aclose()
        await stream.aclose()
        return aborts

    assert asyncio.run(main()) == ["req-1"]


def test_a_stream_dropped_unread_aborts_its_request() -> None:
    # A response that never started (its client left before the headers) never reads its streams.
    async def main() -> list[str]:
        aborts: list[str] = []
        stream, _ = _stream(aborts)
        del stream
        gc.collect()
        return aborts

    assert asyncio.run(main()) == ["req-1"]


def test_a_refused_request_raises_and_needs_no_abort() -> None:
    async def main() -> tuple[str, list[str]]:
        aborts: list[str] = []
        stream, sink = _stream(aborts)
        sink.put_nowait(ValueError("prompt too long"))
        try:
            await stream.__anext__()
        except ValueError as exc:
            message = str(exc)
        await stream.aclose()
        return message, aborts

    assert asyncio.run(main()) == ("prompt too long", [])
