"""Python's garbage collector, tuned for a process that runs an engine.

A decode step makes and drops thousands of small objects (outputs, their metrics, token lists): at batch
1,024 the collector's default youngest-generation threshold of 700 ran it ~16 times a step, ~8 ms of the
engine's ~35 ms of host work a step (`scripts/host_step_time.py --batch-size 1024` on the development
CPU; docs/benchmarks.md). Almost all of those objects are freed by reference counting, so collecting the
young generation every 10,000 surviving objects instead took that to ~0 and costs no memory worth
counting. KILN_GC_THRESHOLD=0 leaves the process's settings alone.
"""

from __future__ import annotations

import gc

from kiln.core.env_numbers import number_from_env

YOUNG_GENERATION_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Raise the youngest generation's threshold to KILN_GC_THRESHOLD (default 10,000), never lower it."""
    threshold = number_from_env(
        "KILN_GC_THRESHOLD", int, YOUNG_GENERATION_THRESHOLD, "an integer", "the garbage collector keeps its settings"
    )
    if threshold is None:
        return
    young, middle, old = gc.get_threshold()
    if threshold > young:
        gc.set_threshold(threshold, middle, old)
