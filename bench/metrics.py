"""Benchmark metrics from per-request timestamps, defined as vLLM's and TensorRT-LLM's benchmarks do.

For a request sent at `start` whose output tokens arrived at t_1 <= ... <= t_n and which ended at `end`:
    TTFT = t_1 - start                       time to first token
    TPOT = (end - t_1) / (n - 1)             time per output token after the first (requests with n > 1)
    ITL  = t_{i+1} - t_i                     inter-token latencies, every gap of every request pooled
    E2E  = end - start                       end-to-end latency
Over a run of `duration` seconds (first send to last end):
    request throughput      = completed requests / duration
    output token throughput = sum of n / duration
    total token throughput  = (sum of prompt tokens + sum of n) / duration
    goodput                 = requests meeting every given SLO (TTFT <= slo_ttft, TPOT <= slo_tpot) / duration
Percentiles use linear interpolation between closest ranks (numpy's default, as vLLM reports them).
A streamed chunk that carries several tokens counts them at its arrival time (ITL gaps of zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestTrace:
    """What one request took; times in seconds on one clock."""

    start: float
    token_times: tuple[float, ...]  # arrival time of each output token
    end: float
    prompt_tokens: int
    success: bool = True
    error: str | None = None
    response_time: float | None = None  # a served request's response headers arrived (its stream began)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.end - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def record(self, run_start: float) -> dict:
        """One line of a report's requests.jsonl: when it was sent (s after the run's first request) and what
        it took (ms), with its longest gap between two tokens, which names the requests a stall hit. A served
        request's `response_ms` (send to response headers) splits its TTFT into the HTTP request's path and
        what the server's engine took after it."""
        ms = lambda seconds: None if seconds is None else round(seconds * 1000, 3)  # noqa: E731
        return {
            "start_s": round(self.start - run_start, 6), "ttft_ms": ms(self.ttft), "tpot_ms": ms(self.tpot),
            "e2e_ms": ms(self.e2e), "max_itl_ms": ms(max(self.itls, default=None)),
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens, "success": self.success,
            "error": self.error,
            "response_ms": None if self.response_time is None else ms(self.response_time - self.start),
        }  # fmt: skip


@dataclass(frozen=True)
class Distribution:
    """mean, percentiles and extremes of one latency, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    count: int

    @classmethod
    def of(cls, seconds: list[float]) -> Distribution | None:
        if not seconds:
            return None
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(float(ms.mean()), p50, p90, p99, float(ms.min()), float(ms.max()), len(seconds))


@dataclass(frozen=True)
class BenchSummary:
    """The results section of a report."""

    duration_s: float
    completed: int
    failed: int
    prompt_tokens: int
    output_tokens: int
    request_throughput: float  # requests / s
    output_token_throughput: float  # tokens / s
    total_token_throughput: float
    goodput: float | None  # requests / s within the SLOs (None without SLOs)
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2e_ms: Distribution | None
    slo: dict[str, float] = field(default_factory=dict)
    # `bench serve`: the server's own mean latencies over the run, from its /metrics (bench/server_metrics.py)
    server: dict[str, float] | None = None


def summarize(
    traces: list[RequestTrace], slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> BenchSummary:
    """Aggregate the traces of one run (failed requests count only as failures)."""
    ok = [t for t in traces if t.success]
    duration = (max(t.end for t in traces) - min(t.start for t in traces)) if traces else 0.0
    output_tokens = sum(t.output_tokens for t in ok)
    prompt_tokens = sum(t.prompt_tokens for t in ok)
    slo = {k: v for k, v in (("ttft_ms", slo_ttft_ms), ("tpot_ms", slo_tpot_ms)) if v is not None}
    goodput = None
    if slo:
        good = [t for t in ok if _meets(t, slo_ttft_ms, slo_tpot_ms)]
        goodput = len(good) / duration if duration > 0 else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return BenchSummary(
        duration_s=duration,
        completed=len(ok),
        failed=len(traces) - len(ok),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_throughput=per_s(len(ok)),
        output_token_throughput=per_s(output_tokens),
        total_token_throughput=per_s(prompt_tokens + output_tokens),
        goodput=goodput,
        ttft_ms=Distribution.of([t.ttft for t in ok if t.ttft is not None]),
        tpot_ms=Distribution.of([t.tpot for t in ok if t.tpot is not None]),
        itl_ms=Distribution.of([gap for t in ok for gap in t.itls]),
        e2e_ms=Distribution.of([t.e2e for t in ok]),
        slo=slo,
    )


def _meets(trace: RequestTrace, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and (trace.ttft is None or trace.ttft * 1000 > slo_ttft_ms):
        return False
    # A single-token request has no TPOT: it meets a TPOT objective trivially.
    return slo_tpot_ms is None or trace.tpot is None or trace.tpot * 1000 <= slo_tpot_ms
