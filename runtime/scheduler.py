"""The scheduler: one token-budget rule instead of prefill and decode phases.

Each step, every request's computed-token count catches up with its token count, under a per-step
budget of `max_num_tokens` and at most `max_batch_size` running requests. A long prompt is split
across steps (chunked prefill) while running requests keep decoding; a request whose prefix is
cached starts with those tokens computed. Running requests are served first, in arrival order; when
KV blocks run out, the most recently admitted running request is preempted (its blocks freed, to be
recomputed later), so the oldest requests always make progress and none is ever lost.
"""

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from kiln.runtime.kv_cache_manager import CachedPrefix, KVCacheManager
from kiln.runtime.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: one per running request per step, and a frozen __init__ costs ~4x
class ScheduledChunk:
    """num_new_tokens of a request's tokens, from position `start`, computed in this step (not to be changed)."""

    request: Request
    start: int
    num_new_tokens: int
    samples: bool  # the chunk reaches the end of the request's tokens, so the step samples a token after it


@dataclass
class SchedulerOutput:
    """What one step computes, in flat-batch order."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens in the flat batch."""
        return sum(chunk.num_new_tokens for chunk in self.chunks)


@dataclass
class SchedulerStats:
    """Counters for metrics and tests."""

    num_preemptions: int = 0
    num_steps: int = 0


class Scheduler:
    """FCFS continuous batching with chunked prefill, prefix caching and recompute preemption."""

    def __init__(self, kv_cache: KVCacheManager, max_batch_size: int, max_num_tokens: int) -> None:
        self.kv_cache = kv_cache
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()

    def add(self, request: Request, front: bool = False) -> None:
        """Queue a request (front: ahead of the others, for samples forked from a running request)."""
        request.status = RequestStatus.WAITING
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's chunks; may preempt running requests when KV blocks run out."""
        output = SchedulerOutput()
        budget = self.max_num_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            index += 1
            if request.num_output_tokens >= request.sampling_params.max_tokens:
                continue  # its last token is still in flight: the step that returns it finishes the request
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, output):
                break  # the request itself was preempted: nobody after it is running any more
            self._schedule_chunk(output, request, request.num_computed_tokens, num_new)
            budget -= num_new
        if not output.preempted:  # admitting new work right after a preemption would just thrash
            self._admit_waiting(output, budget)
        self.stats.num_steps += 1
        return output

    def _allocate_or_preempt(self, request: Request, num_new: int, output: SchedulerOutput) -> bool:
        """Find KV blocks for a running request, preempting the newest running ones if needed."""
        while (
            self.kv_cache.allocate(request.request_id, request.token_ids, request.num_computed_tokens, num_new) is None
        ):
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> None:
        now = time.monotonic() if self.waiting else 0.0
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            num_computed, cached_prefix = self._reusable_prefix(request)
            num_new = min(request.num_tokens - num_computed, budget)
            new_blocks = self.kv_cache.allocate(
                request.request_id, request.token_ids, num_computed, num_new, cached_prefix=cached_prefix
            )
            if new_blocks is None:
                self.kv_cache.free(request.request_id)  # drop blocks a fork shared; retried next step
                break  # FCFS: later requests wait behind this one
            self.waiting.popleft()
            request.fork_from = None  # shared once; a later preemption recomputes like any request
            if request.num_preemptions == 0 and request.num_computed_tokens == 0:
                request.num_cached_prompt_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:  # a preempted request's queueing ended the first time
                request.first_scheduled_time = now
            self.running.append(request)
            self._schedule_chunk(output, request, num_computed, num_new)
            budget -= num_new

    @staticmethod
    def _schedule_chunk(output: SchedulerOutput, request: Request, start: int, num_new: int) -> None:
        """Count the chunk's tokens computed now, so the next step can be scheduled while this one runs."""
        samples = start + num_new == request.num_tokens
        output.chunks.append(ScheduledChunk(request, start, num_new, samples))
        request.num_computed_tokens = start + num_new
        if samples:
            request.num_pending_tokens += 1

    def _reusable_prefix(self, request: Request) -> tuple[int, CachedPrefix | None]:
        """Tokens a waiting request need not compute: shared from its sibling, or found in the prefix cache."""
        if request.fork_from is not None and self.kv_cache.block_ids(request.fork_from):
            return self.kv_cache.fork(request.fork_from, request.request_id, request.num_prompt_tokens), None
        if request.sampling_params.prompt_logprobs is not None:
            return 0, None  # every prompt position must be computed to report its logprob
        prefix = self.kv_cache.find_cached_prefix(request.token_ids)
        return prefix.num_tokens, prefix

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1
        logger.debug("preempted %s (KV cache full)", request.request_id)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append a step's sampled tokens, finish requests; returns the requests that changed.

        A request may have ended (aborted, or stopped by the token of the step before) while this step ran;
        what the step computed for it is dropped.
        """
        now = time.monotonic()
        changed = []
        for chunk in output.chunks:
            request = chunk.request
            if request.is_finished:
                continue
            token = sampled.get(request.request_id) if chunk.samples else None
            if token is not None:
                request.append_output(token, now)
            # Blocks whose tokens are all known and computed may now serve other requests' prefixes.
            self.kv_cache.cache_computed_blocks(request.request_id, request.token_ids, request.num_computed_tokens)
            if token is None:
                continue  # a prefill chunk that does not reach the end of the prompt yet
            self._check_stop(request, token, now)
            changed.append(request)
        return changed

    def _check_stop(self, request: Request, token: int, now: float) -> None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)  # the step that sampled `token` is done: nothing pending
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                self.finish(request, "stop", now, stop_reason=token)
                return
            if token in params.stop_token_ids:
                self.finish(request, "stop", now, stop_reason=token)
                return
        if num_output >= params.max_tokens:
            self.finish(request, "length", now)

    def finish(
        self, request: Request, reason: str, now: float | None = None, stop_reason: int | str | None = None
    ) -> None:
        """End a request (stop, length, abort) and free its KV blocks at once."""
        if request.is_finished:
            return
        request.finish(reason, now if now is not None else time.monotonic(), stop_reason)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.request_id)
