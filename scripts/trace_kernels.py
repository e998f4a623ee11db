"""Each kernel's own share of a GPU timeline, from a Chrome trace of the torch profiler.

With programmatic dependent launch (kernels/pdl.py) a kernel starts before the one ahead of it ends and
waits inside; the profiler's per-kernel times then count that wait, so its table adds up to more than the
steps took (150-180% of the wall time at batch 1). Here a kernel is charged only the time after everything
before it on the GPU ended, and the time with no kernel running is reported on its own: the sums add up to
the timeline's span.

    python scripts/trace_kernels.py TRACE.json [--steps N] [--top K]

`scripts/profile_engine.py` prints this table for the decode steps it profiles.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class KernelShare:
    """One kernel name's time in the timeline: charged microseconds (not overlapped) and launches."""

    name: str
    charged_us: float
    launches: int


@dataclass(frozen=True)
class Timeline:
    """A trace's GPU timeline taken apart: its span, the time with nothing running, each kernel's share."""

    span_us: float
    idle_us: float
    kernels: list[KernelShare]  # largest share first


def take_apart(events: list[dict]) -> Timeline:
    """The timeline of the trace's GPU events (kernels, copies, sets), in start order, one queue assumed."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in _GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return Timeline(0.0, 0.0, [])
    charged: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    busy_until = gpu[0]["ts"]
    idle = 0.0
    for event in gpu:
        start, end = event["ts"], event["ts"] + event["dur"]
        idle += max(0.0, start - busy_until)
        charged[event["name"]] += max(0.0, end - max(busy_until, start))
        launches[event["name"]] += 1
        busy_until = max(busy_until, end)
    shares = [KernelShare(name, charged[name], launches[name]) for name in charged]
    shares.sort(key=lambda share: -share.charged_us)
    return Timeline(busy_until - gpu[0]["ts"], idle, shares)


def table(timeline: Timeline, steps: int, top: int) -> str:
    """The timeline per step: span, idle time, then the `top` kernels by their share."""
    per = max(steps, 1)
    lines = [
        f"GPU timeline: {timeline.span_us / per:.1f} us a step, {timeline.idle_us / per:.1f} us of it with no "
        f"kernel running; each kernel charged only past the end of everything before it (PDL waits excluded):"
    ]
    for share in timeline.kernels[:top]:
        each = share.charged_us / share.launches
        counts = f"{share.charged_us / per:9.1f} us/step {share.launches / per:7.1f}/step {each:8.2f} us each"
        lines.append(f"{counts}  {share.name[:70]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, default=1, help="steps in the trace (the table is per step)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    events = json.loads(args.trace.read_text())["traceEvents"]
    print(table(take_apart(events), args.steps, args.top))


if __name__ == "__main__":
    main()
