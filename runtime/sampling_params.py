"""Per-request sampling settings, with vLLM's names and defaults, validated at construction."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.core.errors import UserInputError
from kiln.runtime.outputs import RequestOutputKind

# Below this temperature a request is decoded greedily (dividing logits by it would overflow).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_NUM_LOGPROBS = 20


def _fail(name: str, allowed: str, value: object) -> UserInputError:
    return UserInputError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but `n=True` is a mistake, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: float = math.inf, allowed: str | None = None) -> None:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise _fail(name, allowed or f"an integer >= {low}", value)


def _check_float(name: str, value: object, low: float, high: float, allowed: str, low_open: bool = False) -> float:
    """Return `value` as a float if it is a finite number in range (written so that NaN fails)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise _fail(name, allowed, value)
    in_range = (low < value if low_open else low <= value) and value <= high
    if not in_range:
        raise _fail(name, allowed, value)
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's tokens and when to stop (names and defaults as in vLLM)."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None  # normalised to tuple[str, ...]
    stop_token_ids: Sequence[int] | None = None  # normalised to tuple[int, ...]
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token; 0 = only the sampled token's
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what each step's output carries

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        if _is_int(self.max_tokens):
            _check_int(
                "min_tokens", self.min_tokens, 0, self.max_tokens, f"an integer in [0, max_tokens={self.max_tokens}]"
            )
        self._set("temperature", _check_float("temperature", self.temperature, 0.0, math.inf, "a number >= 0"))
        self._set("top_p", _check_float("top_p", self.top_p, 0.0, 1.0, "a number in (0, 1]", low_open=True))
        _check_int("top_k", self.top_k, -1, allowed="an integer >= 1, or 0 or -1 for no top-k")
        self._set("min_p", _check_float("min_p", self.min_p, 0.0, 1.0, "a number in [0, 1]"))
        penalty = _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, "a number > 0", True)
        self._set("repetition_penalty", penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            self._set(name, _check_float(name, getattr(self, name), -2.0, 2.0, "a number in [-2, 2]"))
        if self.seed is not None and not _is_int(self.seed):
            raise _fail("seed", "an integer or None", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, MAX_NUM_LOGPROBS, f"an integer in [0, {MAX_NUM_LOGPROBS}] or None")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "true or false", getattr(self, name))
        if not isinstance(self.output_kind, RequestOutputKind):
            raise _fail("output_kind", "a RequestOutputKind", self.output_kind)
        self._set("stop", self._normalise_stop(self.stop))
        self._set("stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids))

    def _set(self, name: str, value: object) -> None:
        # The dataclass is frozen; normalising during construction is the one allowed write.
        object.__setattr__(self, name, value)

    @staticmethod
    def _normalise_stop(stop: object) -> tuple[str, ...]:
        if stop is None:
            return ()
        strings = (stop,) if isinstance(stop, str) else stop
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
            raise _fail("stop", "a non-empty string, a list of non-empty strings, or None", stop)
        return tuple(strings)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise _fail("stop_token_ids", "a list of token ids (integers >= 0) or None", ids)
        return tuple(ids)

    @property
    def needs_output_tokens_on_host(self) -> bool:
        """Whether sampling reads every earlier output token (penalties), so no step may still be in flight."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def is_greedy(self) -> bool:
        """Whether tokens are picked by argmax (temperature 0) rather than drawn."""
        return self.temperature < GREEDY_TEMPERATURE_EPS
