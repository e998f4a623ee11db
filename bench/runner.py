"""What `kiln bench throughput|latency|serve` run: model and workload set-up, warm-up, the measured runs."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.bench.metrics import BenchSummary, RequestTrace, summarize
from kiln.bench.workload import Workload, from_jsonl, from_sharegpt, synthetic
from kiln.core.errors import UserInputError


@dataclass(frozen=True)
class WorkloadSpec:
    """Where the requests come from."""

    num_requests: int = 256
    input_len: int = 128
    output_len: int = 128
    len_std: float = 0.0
    dataset: Path | None = None  # .jsonl prompts, or a ShareGPT .json
    seed: int = 0


@dataclass
class RunResult:
    """The runs of one benchmark: summary and traces per run name."""

    workload: Workload
    model_dir: Path | None
    summaries: dict[str, BenchSummary] = field(default_factory=dict)
    traces: dict[str, list[RequestTrace]] = field(default_factory=dict)
    # What kiln's engine resolved (batch sizes, KV blocks, backend, graphs, async scheduling): a report
    # says what ran, also where an option was left to its default or the environment changed it.
    engine: dict[str, Any] = field(default_factory=dict)


def make_workload(spec: WorkloadSpec, vocab_size: int, tokenizer: Any) -> Workload:
    """The workload of a spec: synthetic unless a dataset file is given."""
    if spec.dataset is None:
        return synthetic(spec.num_requests, spec.input_len, spec.output_len, vocab_size, spec.seed, spec.len_std)
    if not spec.dataset.is_file():
        raise UserInputError(f"dataset {spec.dataset} does not exist")
    if spec.dataset.suffix == ".json":
        return from_sharegpt(spec.dataset, tokenizer, spec.num_requests, spec.seed)
    return from_jsonl(spec.dataset, tokenizer, spec.output_len, spec.num_requests)


def open_engine(
    model: str, engine_options: dict[str, Any], dummy_preset: str | None, dummy_quantization: str | None = None
):
    """The engine for a model argument, or for a preset / config.json with random weights."""
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.engine_config import EngineConfig
    from kiln.runtime.model_dir import resolve_dummy_model, resolve_model_source

    if dummy_preset is not None:
        model_dir = resolve_dummy_model(dummy_preset, dummy_quantization)
        engine_options = {**engine_options, "dummy_weights": True}
    else:
        model_dir = resolve_model_source(model)
    return LLMEngine(model_dir, EngineConfig(**engine_options)), model_dir


def run_offline(
    mode: str, model: str, workload_spec: WorkloadSpec, engine_options: dict[str, Any], *, dummy_preset: str | None,
    ignore_eos: bool, warmup: int, batch_size: int, backend: str, hf_batch_size: int, progress=None,
    dummy_quantization: str | None = None,
) -> RunResult:  # fmt: skip
    """throughput or latency through kiln's engine, and with backend "hf" also through transformers."""
    from kiln.bench.offline import run_latency, run_throughput

    engine, model_dir = open_engine(model, engine_options, dummy_preset, dummy_quantization)
    if backend == "hf" and dummy_quantization is not None:
        raise UserInputError("--backend hf runs unquantized models only; drop --dummy-quantization")
    workload = make_workload(workload_spec, engine.model_config.vocab_size, engine.tokenizer)
    requests = list(workload.requests)
    result = RunResult(workload, None if dummy_preset else model_dir)
    result.engine = {**dataclasses.asdict(engine.limits), "async_scheduling": engine.async_scheduling}
    if warmup:  # compiles kernels and fills allocator pools; not measured
        run_throughput(
            engine, _warmup_requests(workload_spec, requests, warmup, engine.model_config.vocab_size), ignore_eos
        )
    if mode == "throughput":
        traces = run_throughput(engine, requests, ignore_eos, progress)
    else:
        traces = run_latency(engine, requests, batch_size, ignore_eos, progress)
    result.traces["kiln"] = traces
    result.summaries["kiln"] = summarize(traces)
    if backend == "hf":
        from kiln.bench.hf_baseline import load_hf_model, run_hf

        device, dtype = next(engine.model.parameters()).device, next(engine.model.parameters()).dtype
        del engine
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        hf_model = load_hf_model(model_dir, dtype, device, dummy_preset is not None)
        size = batch_size if mode == "latency" else hf_batch_size
        hf_traces = run_hf(hf_model, requests, size, device, progress)
        result.traces["hf"] = hf_traces
        summary = summarize(hf_traces)  # token-level latencies are not observable through generate()
        result.summaries["hf"] = dataclasses.replace(summary, ttft_ms=None, tpot_ms=None, itl_ms=None)
    return result


def _warmup_requests(spec: WorkloadSpec, requests: list, count: int, vocab_size: int) -> list:
    """Warm-up requests shaped like the measured ones but with other tokens: a copy of a measured prompt
    would let that one hit the prefix cache and report a prefill it never ran."""
    if spec.dataset is not None:
        return requests[:count]
    return list(synthetic(count, spec.input_len, spec.output_len, vocab_size, spec.seed + 1, spec.len_std).requests)


def run_serve(
    url: str, model: str | None, workload_spec: WorkloadSpec, tokenizer_dir: Path | None, vocab_size: int | None, *,
    concurrencies: list[int | None], request_rate: float | None, ignore_eos: bool, api_key: str,
    slo_ttft_ms: float | None, slo_tpot_ms: float | None, warmup: int = 0, progress=None, client: str = "http",
) -> RunResult:  # fmt: skip
    """Load at each concurrency (a sweep when several), against a running server.

    warmup: the workload's first requests sent one at a time first, not measured: the client's first request
    paid ~35 ms of its own first use (send to response headers 41 ms against ~4 for the next ones, on an
    H200 host), which is not the server's latency. vLLM's benchmark sends such a request too.
    """
    from kiln.bench.serve_client import run_load
    from kiln.bench.server_metrics import scrape, server_latency

    model, max_len = _served_model(url, model, api_key)
    tokenizer = None
    if tokenizer_dir is not None:
        from kiln.runtime.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    workload = make_workload(workload_spec, vocab_size or 32000, tokenizer)
    result = RunResult(workload, None)
    if warmup:
        asyncio.run(
            run_load(url, model, list(workload.requests[:warmup]), concurrency=1, request_rate=None,
                     ignore_eos=ignore_eos, seed=workload_spec.seed, api_key=api_key, client=client)
        )  # fmt: skip
    for concurrency in concurrencies:
        before = scrape(url)
        traces = asyncio.run(
            run_load(url, model, list(workload.requests), concurrency=concurrency, request_rate=request_rate,
                     ignore_eos=ignore_eos, seed=workload_spec.seed, api_key=api_key, progress=progress,
                     client=client)
        )  # fmt: skip
        name = str(concurrency) if concurrency else "unbounded"
        result.traces[name] = traces
        summary = summarize(traces, slo_ttft_ms, slo_tpot_ms)
        result.summaries[name] = dataclasses.replace(summary, server=server_latency(before, scrape(url)))
    return result


def _served_model(url: str, model: str | None, api_key: str) -> tuple[str, int | None]:
    """The model to ask for: the given name, or the server's only one."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            cards = json.loads(response.read())["data"]
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        raise UserInputError(f"cannot list the models of {url}: {exc}") from exc
    if model is None:
        if len(cards) != 1:
            raise UserInputError(f"{url} serves {len(cards)} models; pick one with --model")
        return cards[0]["id"], cards[0].get("max_model_len")
    return model, None
