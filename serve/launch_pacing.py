"""Launching the next step as late as is safe, so that a request arriving meanwhile joins it.

With async scheduling the engine queues step N+1 on the GPU as soon as step N starts there. A prompt that
arrives after that waits for the rest of N and then all of N+1 before its prefill starts: ~1.5 decode steps on
average (~7.5 ms at 5 ms a step), a large part of a 30 ms time to first token. The server therefore holds the
launch of N+1 until shortly before N should end, and launches at once if a request arrives meanwhile (it then
joins N+1). N's expected end is when it started on the GPU (its launch, or the read-back of the step before
it, whichever was later) plus the shortest recent time between two read-backs: launched back to back, steps
finish one GPU step apart, and a late launch only makes that time longer, so the shortest one never
overestimates a step and a late launch cannot make the pacing later still. The launch is then held
until that end less a lead: the longest recent decode launch plus a margin, so the GPU does not wait for it.

KILN_PACE_LAUNCHES=0 turns it off (launch at once, as the offline engine does).
"""

from __future__ import annotations

import os
from collections import deque

from kiln.runtime.step_clock import StepClock

WINDOW = 16  # read-back intervals and decode launch times remembered
MIN_SAMPLES = 4  # no pacing before this many of each
MARGIN_SECONDS = 0.0005  # on top of the longest recent decode launch


def pacing_enabled() -> bool:
    """Whether the server paces its launches (KILN_PACE_LAUNCHES, on by default)."""
    return os.environ.get("KILN_PACE_LAUNCHES", "1") != "0"


class LaunchPacer:
    """Learns a step's GPU time and a decode launch's host time from the engine's clock; says when to launch."""

    def __init__(self) -> None:
        self._intervals: deque[float] = deque(maxlen=WINDOW)
        self._decode_launches: deque[float] = deque(maxlen=WINDOW)
        self._last_read_back: float | None = None
        self._last_launch: float | None = None

    def observe(self, clock: StepClock) -> None:
        """Take the times of the step just run (call after each engine step)."""
        if clock.read_back_at and clock.read_back_at != self._last_read_back:
            if self._last_read_back is not None:
                self._intervals.append(clock.read_back_at - self._last_read_back)
            self._last_read_back = clock.read_back_at
        if clock.launched_at and clock.launched_at != self._last_launch:
            self._last_launch = clock.launched_at
            if clock.launched_decode_only:
                self._decode_launches.append(clock.launch_seconds)

    def launch_at(self, clock: StepClock) -> float | None:
        """When to launch the next step while one is in flight (time.monotonic), or None to launch now."""
        if len(self._intervals) < MIN_SAMPLES or len(self._decode_launches) < MIN_SAMPLES:
            return None
        started = max(clock.read_back_at, clock.launched_at)  # the step in flight began on the GPU no earlier
        lead = max(self._decode_launches) + MARGIN_SECONDS
        return started + min(self._intervals) - lead
