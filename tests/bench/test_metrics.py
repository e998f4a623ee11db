"""Benchmark metrics on hand-made timestamp traces, against numbers worked out by hand."""

from __future__ import annotations

import pytest

from kiln.bench.metrics import RequestTrace, summarize


def trace(start, tokens, end=None, prompt=10, success=True):
    return RequestTrace(start, tuple(tokens), tokens[-1] if end is None else end, prompt, success)


TRACES = [
    trace(0.0, [0.10, 0.15, 0.20, 0.25]),  # TTFT 100 ms, TPOT (0.25-0.10)/3 = 50 ms, E2E 250 ms
    trace(0.5, [0.70, 0.80, 0.90]),  # TTFT 200 ms, TPOT 100 ms, E2E 400 ms
    trace(1.0, [1.05]),  # TTFT 50 ms, no TPOT, E2E 50 ms
    trace(1.0, [1.40, 1.60], end=2.0),  # TTFT 400 ms, TPOT (2.0-1.4)/1 = 600 ms, E2E 1000 ms
]


def test_latencies_and_throughputs_by_hand():
    s = summarize(TRACES)
    assert s.duration_s == pytest.approx(2.0)  # first send 0.0, last end 2.0
    assert (s.completed, s.failed, s.output_tokens, s.prompt_tokens) == (4, 0, 10, 40)
    assert s.request_throughput == pytest.approx(2.0)
    assert s.output_token_throughput == pytest.approx(5.0)
    assert s.total_token_throughput == pytest.approx(25.0)
    # TTFT ms sorted: 50, 100, 200, 400 -> mean 187.5; p50 = 150 (between ranks 2 and 3);
    # p90 = 200 + 0.7 * (400 - 200) = 340 (rank 0.9 * 3 = 2.7); p99 = 200 + 0.97 * 200 = 394.
    assert s.ttft_ms.mean == pytest.approx(187.5)
    assert (s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99) == pytest.approx((150.0, 340.0, 394.0))
    # TPOT ms: 50, 100, 600 (the one-token request has none) -> mean 250, p50 100, p90 500, p99 590.
    assert s.tpot_ms.count == 3 and s.tpot_ms.mean == pytest.approx(250.0)
    assert (s.tpot_ms.p50, s.tpot_ms.p90, s.tpot_ms.p99) == pytest.approx((100.0, 500.0, 590.0))
    # ITL pooled: 50, 50, 50 | 100, 100 | - | 200 -> mean 550 / 6.
    assert s.itl_ms.count == 6 and s.itl_ms.mean == pytest.approx(550 / 6)
    assert s.e2e_ms.max == pytest.approx(1000.0) and s.e2e_ms.min == pytest.approx(50.0)
    assert s.goodput is None


def test_goodput_counts_requests_meeting_every_slo():
    s = summarize(TRACES, slo_ttft_ms=250, slo_tpot_ms=120)
    # meets: #1 (100, 50), #2 (200, 100), #3 (50, no TPOT); misses: #4 (TTFT 400) -> 3 requests / 2 s.
    assert s.goodput == pytest.approx(1.5)
    assert summarize(TRACES, slo_ttft_ms=60).goodput == pytest.approx(0.5)  # only #3
    assert s.slo == {"ttft_ms": 250, "tpot_ms": 120}


def test_failures_are_counted_not_measured():
    s = summarize([*TRACES, trace(0.0, [3.0], prompt=99, success=False)])
    assert (s.completed, s.failed, s.prompt_tokens) == (4, 1, 40)
    assert s.duration_s == pytest.approx(3.0)  # the failed request still spans the run
    assert summarize([]).completed == 0


def test_warmup_requests_are_shaped_like_the_measured_ones_but_share_no_prompt():
    # A warm-up copy of a measured prompt would let that request hit the prefix cache in the measured run.
    from kiln.bench.runner import WorkloadSpec, _warmup_requests, make_workload

    spec = WorkloadSpec(num_requests=4, input_len=16, output_len=8)
    measured = list(make_workload(spec, 1000, None).requests)
    warmup = _warmup_requests(spec, measured, 2, 1000)
    assert [len(r.prompt_token_ids) for r in warmup] == [16, 16] and {r.output_len for r in warmup} == {8}
    assert not {tuple(r.prompt_token_ids) for r in warmup} & {tuple(r.prompt_token_ids) for r in measured}


def test_request_records_by_hand():
    # The report's requests.jsonl lines: sent at (s after the run's first request), latencies in ms.
    slow = TRACES[3].record(run_start=0.0)
    assert slow == {
        "start_s": 1.0, "ttft_ms": 400.0, "tpot_ms": 600.0, "e2e_ms": 1000.0, "max_itl_ms": 200.0,
        "prompt_tokens": 10, "output_tokens": 2, "success": True, "error": None, "response_ms": None,
    }  # fmt: skip
    single = TRACES[2].record(run_start=0.5)
    assert (single["start_s"], single["tpot_ms"], single["max_itl_ms"]) == (0.5, None, None)
    failed = RequestTrace(2.0, (), 2.5, 10, False, "boom").record(run_start=0.0)
    assert (failed["ttft_ms"], failed["success"], failed["error"]) == (None, False, "boom")
    served = RequestTrace(2.0, (2.25,), 2.5, 10, response_time=2.0125).record(run_start=0.0)
    assert (served["response_ms"], served["ttft_ms"]) == (12.5, 250.0)
