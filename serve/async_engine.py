"""The engine on its own thread, and an asyncio face for the HTTP side.

`LLMEngine` is not thread-safe, so one thread owns it: it takes commands (add, abort) from a queue,
steps the engine while anything is unfinished, and hands every output to the asyncio loop of the
request that owns it. The HTTP handlers never block on the engine and the engine never waits for a
slow client: a client that goes away cancels its generator, which aborts the request at once (its
KV blocks are freed on the engine thread before the next step). While a step is in flight, the thread
holds the next launch until shortly before that step should end and launches at once when a request
arrives, so that the request joins the next step (serve/launch_pacing.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_clock import StepClock
from kiln.serve.launch_pacing import LaunchPacer, pacing_enabled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken on the engine thread after each step (read by /metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks_in_use: int = 0
    num_preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0


class RequestStream:
    """The outputs of one submitted request, as an async iterator; `aclose` before its end aborts it
    (a client that went away, or a handler that failed: its KV blocks are freed at once)."""

    def __init__(self, sink: asyncio.Queue, abort: Callable[[], None]) -> None:
        self._sink = sink
        self._abort = abort
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._sink.get()
        if isinstance(item, BaseException):
            self._done = True  # the engine refused or failed the request and holds nothing of it
            raise item
        self._done = item.finished
        return item

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:  # a stream dropped unread (a response that never started) frees its request
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._abort()


class AsyncEngine:
    """Owns the engine thread; `generate` submits a request and returns the stream of its outputs."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.stats = EngineStats()
        # SimpleQueue: its put may run inside a RequestStream's __del__ (a reentrant put).
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._pacer = LaunchPacer() if pacing_enabled() and engine.async_scheduling else None
        if self._pacer is not None:
            engine.clock = StepClock()  # the engine records its launch and read-back times in it
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float | None = None
    ) -> RequestStream:
        """Submit one request now (from the event loop's thread); iterate the result for its outputs.

        Submitted here, not on the first iteration, so the engine starts the prompt while the HTTP side is
        still sending the response's headers. `arrival_time` (time.monotonic(), default now) starts the
        request's TTFT and queue time: the handler passes its own entry time.
        """
        request_id = f"req-{next(self._ids)}"
        sink: asyncio.Queue = asyncio.Queue()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._commands.put(("add", request_id, prompt_token_ids, params, asyncio.get_running_loop(), sink, arrival))
        return RequestStream(sink, lambda: self._commands.put(("abort", request_id)))

    def num_unfinished(self) -> int:
        """Requests the engine still holds (running or waiting)."""
        return self.stats.num_running + self.stats.num_waiting

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (after the step in progress)."""
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            timeout = self._command_wait()
            try:
                self._apply(self._commands.get(block=timeout is not None, timeout=timeout))
                while True:  # everything queued before this step
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            if self.engine.has_unfinished:
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a failed step must not kill the server: fail its requests
                    logger.exception("engine step failed")
                    self._fail_all(exc)
                    continue
                for output in outputs:
                    self._deliver(output.request_id, output, done=output.finished)
                if self._pacer is not None:
                    self._pacer.observe(self.engine.clock)
            self._snapshot()

    def _command_wait(self) -> float | None:
        """How long to wait for a command before the next step: idle, until one comes; paced, until the launch."""
        engine = self.engine
        if not engine.has_unfinished:
            return 0.5  # then look at the stop flag again
        if self._pacer is None or not engine.step_in_flight:
            return None
        launch_at = self._pacer.launch_at(engine.clock)
        wait = None if launch_at is None else launch_at - time.monotonic()
        return wait if wait is not None and wait > 0 else None

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, token_ids, params, loop, sink, arrival_time = command
            self._sinks[request_id] = (loop, sink)
            try:
                self.engine.add_request(token_ids, params, request_id=request_id, arrival_time=arrival_time)
            except Exception as exc:  # refused (too long, bad token ids): the handler answers 400
                self._deliver(request_id, exc, done=True)
        elif kind == "abort":
            request_id = command[1]
            if self._sinks.pop(request_id, None) is not None:
                self.engine.abort(request_id)

    def _deliver(self, request_id: str, item: object, done: bool) -> None:
        target = self._sinks.pop(request_id, None) if done else self._sinks.get(request_id)
        if target is not None:
            loop, sink = target
            loop.call_soon_threadsafe(sink.put_nowait, item)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self._sinks):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"the engine failed: {exc}"), done=True)

    def _snapshot(self) -> None:
        scheduler, kv = self.engine.scheduler, self.engine.kv_cache
        self.stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=kv.usage,
            num_kv_blocks_in_use=kv.pool.num_blocks - 1 - kv.num_free_blocks,
            num_preemptions=scheduler.stats.num_preemptions,
            prefix_cache_hit_rate=kv.prefix_hit_rate,
        )
