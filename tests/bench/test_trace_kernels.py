"""scripts/trace_kernels.py: kernels overlapped by PDL are charged only their own time; idle gaps apart."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
from trace_kernels import table, take_apart  # noqa: E402


def _kernel(name: str, start: float, duration: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": duration}


def test_a_kernel_launched_early_is_charged_only_past_the_end_of_the_one_before() -> None:
    events = [
        _kernel("gemv", 0.0, 10.0),
        _kernel("norm", 2.0, 11.0),  # launched early (PDL): waits until 10, then runs to 13
        _kernel("gemv", 15.0, 5.0),  # 2 us with nothing running before it
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 50.0},  # host events are left out
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1.0},
    ]
    timeline = take_apart(events)
    assert timeline.span_us == 20.0
    assert timeline.idle_us == 2.0
    shares = {share.name: (share.charged_us, share.launches) for share in timeline.kernels}
    assert shares == {"gemv": (15.0, 2), "norm": (3.0, 1)}
    assert [share.name for share in timeline.kernels] == ["gemv", "norm"]
    assert sum(share.charged_us for share in timeline.kernels) + timeline.idle_us == timeline.span_us
    text = table(timeline, steps=2, top=5)
    assert "10.0 us a step, 1.0 us of it with no kernel running" in text
    assert "7.5 us/step" in text and "norm" in text


def test_a_trace_without_gpu_events_is_an_empty_timeline() -> None:
    timeline = take_apart([{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0.0, "dur": 1.0}])
    assert timeline.span_us == 0.0 and timeline.kernels == []
