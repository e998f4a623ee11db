"""Prometheus metrics of the server (prometheus-client), named like vLLM's where they mean the same."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kiln.runtime.outputs import RequestOutput
from kiln.serve.async_engine import EngineStats

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class ServerMetrics:
    """One registry per server (tests run several in a process)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.requests = Counter(
            "kiln_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Generated tokens of finished requests", registry=r)
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "kiln_time_per_output_token_seconds", "Mean time between output tokens of a request",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "kiln_request_queue_time_seconds", "Arrival until a step first took the request",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prefill_time = Histogram(
            "kiln_request_prefill_time_seconds", "First scheduled step to first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "kiln_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("kiln_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("kiln_num_requests_waiting", "Requests queued for the batch", registry=r)
        self.kv_usage = Gauge("kiln_kv_cache_usage_ratio", "Fraction of KV blocks held by requests", registry=r)
        self.kv_blocks = Gauge("kiln_kv_cache_blocks_in_use", "KV blocks held by requests", registry=r)
        self.preemptions = Gauge("kiln_num_preemptions", "Requests preempted (recomputed) so far", registry=r)
        self.prefix_hit_rate = Gauge(
            "kiln_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache", registry=r
        )
        self.info = Gauge("kiln_model_info", "The served model", list(labels), registry=r)
        self.info.labels(**labels).set(1)

    def observe_finished(self, output: RequestOutput) -> None:
        """Token counts and latencies of a finished request."""
        metrics = output.metrics
        generated = sum(len(completion.token_ids) for completion in output.outputs)
        self.prompt_tokens.inc(metrics.num_prompt_tokens)
        self.generation_tokens.inc(generated)
        for histogram, seconds in (
            (self.ttft, metrics.time_to_first_token),
            (self.queue_time, metrics.queue_time),
            (self.prefill_time, metrics.prefill_time),
        ):
            if seconds is not None:
                histogram.observe(seconds)
        if metrics.latency is not None:
            self.e2e.observe(metrics.latency)
            longest = max(len(completion.token_ids) for completion in output.outputs)
            if longest > 1 and metrics.time_to_first_token is not None:
                self.tpot.observe((metrics.latency - metrics.time_to_first_token) / (longest - 1))

    def render(self, stats: EngineStats) -> bytes:
        """The text exposition format, with the engine's gauges as of its last step."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_blocks.set(stats.num_kv_blocks_in_use)
        self.preemptions.set(stats.num_preemptions)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        return generate_latest(self.registry)
