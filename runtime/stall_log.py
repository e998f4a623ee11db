"""KILN_LOG_STALLS=<ms>: log engine steps slower than <ms>, and every Triton kernel the process compiles.

For one-off stalls while serving (a TTFT p99 far above its p50): the slow step's log line says what it
computed, and a kernel compiled mid-run (Triton builds one binary per specialisation of its arguments, e.g.
an integer that is 1, a multiple of 16 or neither) is logged with its name, arguments and time, just before.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from kiln.core.env_numbers import number_from_env
from kiln.runtime.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_compile_started: dict[object, float] = {}


def stall_threshold_ms() -> float | None:
    """The KILN_LOG_STALLS threshold in milliseconds, or None when it is unset or not a number."""
    return number_from_env("KILN_LOG_STALLS", float, None, "a number of milliseconds", "stalls are not logged")


def log_kernel_compiles() -> None:
    """Log each Triton kernel this process compiles or loads from its disk cache (Triton's JIT hooks)."""
    try:
        from triton import knobs
    except ImportError:  # no Triton (CPU machines): nothing is compiled
        return

    def before(*, key, **_) -> bool:
        _compile_started[key] = time.perf_counter()
        return False  # False: compile as usual

    def after(*, key, fn, compile, **_) -> None:  # noqa: A002 - Triton's keywords
        elapsed = time.perf_counter() - _compile_started.pop(key, time.perf_counter())
        params = fn.jit_function.params
        names = [param.name for param in params]
        declared = {param.name for param in params if param.is_constexpr}
        described = describe_specialisation(names, declared, compile["constants"], compile["configs"][0])
        logger.warning("compiled kernel %s in %.0f ms: %s", fn.name, elapsed * 1000, described)

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after


class SlowStepLog:
    """KILN_LOG_STALLS for one engine: kernel compiles logged from its creation on, slow steps after each step."""

    def __init__(self) -> None:
        self.threshold_ms = stall_threshold_ms()
        if self.threshold_ms is not None:
            log_kernel_compiles()

    def after_step(self, started: float, scheduled: SchedulerOutput) -> None:
        """Log the step begun at `started` (time.perf_counter) if it took longer than the threshold."""
        if self.threshold_ms is None:
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        if elapsed_ms > self.threshold_ms:
            logger.warning("slow step: %.0f ms; it launched %s", elapsed_ms, describe_step(scheduled))


def describe_specialisation(
    names: list[str], declared_constexprs: set[str], constants: dict[tuple, object], attrs: dict[tuple, list]
) -> str:
    """'BLOCK_M=64, head_dim%16, stride_bt=1*' from Triton's compile arguments (keys are argument paths).

    Declared constexprs show their values; arguments Triton specialised show `=value*` (an integer that
    was 1) or `%16` (divisible by 16, or a 16-byte aligned pointer): the classes that compile anew.
    """
    parts = []
    for index, name in enumerate(names):
        if (index,) in constants:
            parts.append(f"{name}={constants[(index,)]}" + ("" if name in declared_constexprs else "*"))
        elif any(attr[0] == "tt.divisibility" for attr in attrs.get((index,), [])):
            parts.append(f"{name}%16")
    return ", ".join(parts)


def describe_step(scheduled: SchedulerOutput) -> str:
    """'3 decode tokens, prefill chunks of 1000 and 24 tokens' for a step's log line."""
    sizes = Counter("decode" if chunk.num_new_tokens == 1 else "prefill" for chunk in scheduled.chunks)
    prefill = [chunk.num_new_tokens for chunk in scheduled.chunks if chunk.num_new_tokens > 1]
    text = f"{sizes['decode']} decode tokens"
    if prefill:
        text += f", prefill chunks of {', '.join(map(str, prefill))} tokens"
    return text
