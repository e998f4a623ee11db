"""What generation returns: one RequestOutput per prompt, with its n completions and timings."""

from dataclasses import dataclass
from enum import Enum

TopLogprobs = dict[int, float]  # token id -> logprob


class RequestOutputKind(Enum):
    """What each output of a request carries (as vLLM's option of the same name).

    CUMULATIVE copies everything generated so far into every step's output: simple, but O(length) a step
    per request. DELTA carries only what the step added; FINAL_ONLY reports once, when the request ends.
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


# slots, and RequestMetrics not frozen: the engine makes one of each per request per step (DELTA outputs), and
# at 1,024 requests a frozen dataclass's __init__ alone took ~2.5 ms of every step's host work (~0.6 without).
@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence (one of the n samples of a prompt)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    logprobs: list[TopLogprobs] | None  # per generated token, when SamplingParams.logprobs was set

    @property
    def finished(self) -> bool:
        """Whether this sequence has ended."""
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Per-request timings (time.monotonic seconds) and cache facts."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_cached_prompt_tokens: int  # found in the prefix cache, not computed
    num_preemptions: int
    first_scheduled_time: float | None = None  # the first step that computed any of it was scheduled

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival until a step first took the request (waiting for a batch slot or KV blocks)."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        """Seconds from the first scheduled step to the first token: computing the prompt, and the step
        already in flight when it was scheduled (async scheduling)."""
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to the end of the last sample."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """The result of one prompt; `.text` and friends are the first completion's, for the common n = 1."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TopLogprobs | None] | None  # None for the first prompt token
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        """Generated text of the first completion."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids of the first completion."""
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        """Why the first completion ended."""
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TopLogprobs] | None:
        """Per-token logprobs of the first completion."""
        return self.outputs[0].logprobs
