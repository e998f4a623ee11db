"""KILN_LOG_STALLS=<ms>: log engine steps slower than <ms>, and every Triton kernel the process compiles.

For one-off stalls while serving (a TTFT p99 far above its p50): the slow step's log line says what it
computed, and a kernel compiled mid-run (Triton builds one binary per specialisation of its arguments, e.g.
an integer that is 1, a multiple of 16 or neither) is logged with its name, arguments and time, just before.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

from kiln.runtime.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_compile_started: dict[object, float] = {}


def stall_threshold_ms() -> float | None:
    """The KILN_LOG_STALLS threshold in milliseconds, or None when it is unset or not a number."""
    value = os.environ.get("KILN_LOG_STALLS")
    try:
        return float(value) if value else None
    except ValueError:
        logger.warning("KILN_LOG_STALLS=%r is not a number of milliseconds; stalls are not logged", value)
        return None


def log_kernel_compiles() -> None:
    """Log each Triton kernel this process compiles or loads from its disk cache (Triton's JIT hooks)."""
    try:
        from triton import knobs
    except ImportError:  # no Triton (CPU machines): nothing is compiled
        return

    def before(*, key, **_) -> bool:
        _compile_started[key] = time.perf_counter()
        return False  # False: compile as usual

    def after(*, key, repr, **_) -> None:  # noqa: A002 - Triton's keyword
        elapsed = time.perf_counter() - _compile_started.pop(key, time.perf_counter())
        logger.warning("compiled kernel in %.0f ms: %s", elapsed * 1000, repr)

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after


def describe_step(scheduled: SchedulerOutput) -> str:
    """'3 decode tokens, prefill chunks of 1000 and 24 tokens' for a step's log line."""
    sizes = Counter("decode" if chunk.num_new_tokens == 1 else "prefill" for chunk in scheduled.chunks)
    prefill = [chunk.num_new_tokens for chunk in scheduled.chunks if chunk.num_new_tokens > 1]
    text = f"{sizes['decode']} decode tokens"
    if prefill:
        text += f", prefill chunks of {', '.join(map(str, prefill))} tokens"
    return text
