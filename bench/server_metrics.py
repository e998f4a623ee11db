"""The server's own view of a `bench serve` run: its latency histograms' means, from /metrics before and after.

The client's TTFT includes what the client and the HTTP path take; the server's starts when its handler has
the request. Side by side they say where a slow first token comes from. kiln's names and vLLM's are read:
TTFT, and its two parts where the server has them (queue: until a step takes the request; prefill: from there
to the first token). A server without a Prometheus /metrics endpoint gives no such section.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

# report key -> histogram names (without the _sum / _count suffixes), kiln's then vLLM's
HISTOGRAMS = {
    "ttft_ms": ("kiln_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
    "queue_ms": ("kiln_request_queue_time_seconds", "vllm:request_queue_time_seconds"),
    "prefill_ms": ("kiln_request_prefill_time_seconds", "vllm:request_prefill_time_seconds"),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? ([-+0-9.eEinfaINF]+)$")


def scrape(url: str, timeout: float = 10.0) -> dict[str, float] | None:
    """The samples of the server's /metrics by name (the series of a labelled name summed), or None."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as response:
            return parse_samples(response.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text format -> {name: value}, the series of a labelled name summed; comments skipped."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1)] = samples.get(match.group(1), 0.0) + float(match.group(2))
    return samples


def server_latency(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Mean milliseconds of each histogram over the requests finished between the two scrapes."""
    if before is None or after is None:
        return None
    found: dict[str, float] = {}
    for key, names in HISTOGRAMS.items():
        for name in names:
            count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
            if count > 0:
                found[key] = 1000 * (after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)) / count
                found.setdefault("requests", count)
                break
    return found or None
