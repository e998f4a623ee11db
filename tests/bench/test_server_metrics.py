"""The server's latency means from two /metrics scrapes: kiln's and vLLM's histogram names."""

import pytest

from kiln.bench.server_metrics import parse_samples, server_latency

KILN_BEFORE = """# HELP kiln_time_to_first_token_seconds Arrival to first token
# TYPE kiln_time_to_first_token_seconds histogram
kiln_time_to_first_token_seconds_bucket{le="0.01"} 1.0
kiln_time_to_first_token_seconds_count 2.0
kiln_time_to_first_token_seconds_sum 0.05
kiln_request_queue_time_seconds_count 2.0
kiln_request_queue_time_seconds_sum 0.01
kiln_request_prefill_time_seconds_count 2.0
kiln_request_prefill_time_seconds_sum 0.04
kiln_requests_total{endpoint="/v1/completions",status="200"} 2.0
kiln_requests_total{endpoint="/metrics",status="200"} 5.0
"""
KILN_AFTER = KILN_BEFORE.replace("_count 2.0", "_count 6.0").replace("sum 0.05", "sum 0.25")
KILN_AFTER = KILN_AFTER.replace("sum 0.01", "sum 0.03").replace("sum 0.04", "sum 0.22")


def test_means_over_the_requests_between_two_scrapes() -> None:
    before, after = parse_samples(KILN_BEFORE), parse_samples(KILN_AFTER)
    assert before["kiln_requests_total"] == 7.0  # labelled series of one name are summed
    latency = server_latency(before, after)
    assert latency == pytest.approx({"ttft_ms": 50.0, "queue_ms": 5.0, "prefill_ms": 45.0, "requests": 4.0})


def test_vllm_names_and_servers_without_metrics() -> None:
    before = parse_samples('vllm:time_to_first_token_seconds_sum{model_name="m"} 1.0\n'
                           'vllm:time_to_first_token_seconds_count{model_name="m"} 10.0\n')  # fmt: skip
    after = parse_samples('vllm:time_to_first_token_seconds_sum{model_name="m"} 1.5\n'
                          'vllm:time_to_first_token_seconds_count{model_name="m"} 20.0\n')  # fmt: skip
    assert server_latency(before, after) == pytest.approx({"ttft_ms": 50.0, "requests": 10.0})
    assert server_latency(None, after) is None and server_latency(before, before) is None
