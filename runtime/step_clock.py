"""When the engine last launched a step and last read one back, for a caller that paces its launches.

The server (serve/launch_pacing.py) holds the next launch until shortly before the step in flight should end,
so that a request arriving meanwhile joins it; it needs these host times (time.monotonic) to tell when that is.
"""

from dataclasses import dataclass


@dataclass(slots=True)
class StepClock:
    """Host times of the engine's last launch and read-back."""

    launched_at: float = 0.0  # the last launched step's kernels were all queued
    launch_seconds: float = 0.0  # host time of its scheduling and launch
    launched_decode_only: bool = False  # every sequence of it brought one token (no prompt chunk)
    read_back_at: float = 0.0  # the last finished step's tokens reached the host
