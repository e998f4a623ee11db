"""A request's runtime state: its tokens, how many are computed, and why it ended."""

import enum
import time
from dataclasses import dataclass, field

from kiln.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; its KV blocks were freed and will be recomputed
    FINISHED = "finished"


@dataclass(eq=False)  # identity: `request in running` must not compare every field of every request
class Request:
    """Mutable state of one sequence being generated (one of the n samples of a user request)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    seed: int  # this sequence's draws are a function of (seed, output position): same seed, same tokens
    arrival_time: float = field(default_factory=time.monotonic)
    fork_from: str | None = None  # a sibling whose prompt KV blocks this sample shares (n > 1)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # counted when scheduled: a step in flight has them computed by the next
    # Tokens sampled by a step still in flight (0 or 1): on the device, not yet in token_ids.
    num_pending_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    # prompt + output; kept as one list because the runner slices it every step.
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled_time: float | None = None  # its first step was scheduled: the end of its queueing
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache on first schedule
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per output token: token id -> logprob
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens, counting one sampled by a step still in flight."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, counting one sampled by a step still in flight."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        """Whether the request has ended (stopped, hit its length, or was aborted)."""
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int, now: float) -> None:
        """Record a newly sampled token (the pending one its step sampled)."""
        self.num_pending_tokens -= 1
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now

    def finish(self, reason: str, now: float, stop_reason: int | str | None = None) -> None:
        """Mark the request ended."""
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = now
