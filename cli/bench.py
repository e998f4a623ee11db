"""`kiln bench throughput|latency|serve|compare`: flags -> bench runner -> report artifact and a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from kiln.cli.console import INVOCATION, stderr_console, stdout_console
from kiln.core.errors import UserInputError

bench_app = typer.Typer(help="Reproducible benchmarks with reports.", no_args_is_help=True)

NUM_REQUESTS = typer.Option(256, "--num-requests")
INPUT_LEN = typer.Option(128, "--input-len")
OUTPUT_LEN = typer.Option(128, "--output-len")
LEN_STD = typer.Option(0.0, "--len-std", help="Length std as a fraction of the mean (0 = fixed lengths).")
DATASET = typer.Option(None, "--dataset", help="JSONL prompts, or a ShareGPT .json file.")
SEED = typer.Option(0, "--seed")
IGNORE_EOS = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Generate exactly the output lengths.")
OUTPUT = typer.Option(None, "--output", "-o", help="Write a report artifact here.")
FORCE = typer.Option(False, "--force", help="Replace a non-empty report directory.")
AS_JSON = typer.Option(False, "--json", help="Print the results as JSON on stdout.")
DUMMY = typer.Option(False, "--dummy-weights", help="Random weights made on the device (MODEL: a config.json).")
MODEL_HELP = "Engine, checkpoint, HF dir, builtin:NAME (or a config.json with --dummy-weights)."
DUMMY_QUANT = typer.Option(None, "--dummy-quantization", help="fp8 (W8A8, fp8 KV) or int4-awq dummy weights.")
TP_SIZE = typer.Option(None, "--tp-size", help="Tensor-parallel ranks, one process per GPU (gloo on the CPU).")
PP_SIZE = typer.Option(None, "--pp-size", help="Pipeline stages, --tp-size processes each.")
ASYNC_SCHEDULING = typer.Option(
    None,
    "--async-scheduling/--no-async-scheduling",
    help="Overlap step N+1's host work with step N [default: on with CUDA].",
)
PRESET = typer.Option(None, "--preset", help="Architecture for --dummy-weights: llama-3-8b, llama-3-70b, ...")


def _engine_options(**given: Any) -> dict[str, Any]:
    return {key: value for key, value in given.items() if value is not None}


def _workload(num_requests, input_len, output_len, len_std, dataset, seed):
    from kiln.bench.runner import WorkloadSpec

    return WorkloadSpec(num_requests, input_len, output_len, len_std, dataset, seed)


def _progress(total: int, quiet: bool):
    if quiet:
        return None, None
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
    )
    task = bar.add_task("requests", total=total)
    return bar, (lambda n: bar.advance(task, n))


def _finish(kind: str, result: Any, options: dict[str, Any], output: Path | None, force: bool, as_json: bool) -> None:
    from dataclasses import asdict

    from kiln.bench.report import write_report

    if output is not None:
        artifact = write_report(
            output,
            kind=kind,
            command=list(INVOCATION),
            options=options,
            model_dir=result.model_dir,
            workload_digest=result.workload.digest,
            summaries=result.summaries,
            traces=result.traces,
            force=force,
        )
        stderr_console.print(f"[green]wrote[/] report {artifact.path}", highlight=False)
    if as_json:
        runs = {name: asdict(summary) for name, summary in result.summaries.items()}
        typer.echo(json.dumps({"kind": kind, "workload_digest": result.workload.digest, "runs": runs}, indent=2))
    else:
        stdout_console.print(summary_table(kind, {n: asdict(s) for n, s in result.summaries.items()}))


def summary_table(title: str, runs: dict[str, dict[str, Any]], ratio_to: str | None = None) -> Table:
    """Runs side by side (with ratios to the first run when comparing)."""
    table = Table(title=title)
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    rows = [
        ("output tok/s", "output_token_throughput", None),
        ("requests/s", "request_throughput", None),
        ("total tok/s", "total_token_throughput", None),
        ("goodput req/s", "goodput", None),
        ("TTFT p50 ms", "ttft_ms", "p50"),
        ("TTFT p99 ms", "ttft_ms", "p99"),
        ("TPOT p50 ms", "tpot_ms", "p50"),
        ("TPOT p99 ms", "tpot_ms", "p99"),
        ("ITL p50 ms", "itl_ms", "p50"),
        ("E2E p50 ms", "e2e_ms", "p50"),
        ("E2E p99 ms", "e2e_ms", "p99"),
        ("completed", "completed", None),
        ("failed", "failed", None),
    ]
    if any(run.get("server") for run in runs.values()):  # bench serve: the server's own means (its /metrics)
        rows += [("server TTFT mean ms", "server", "ttft_ms"), ("server queue mean ms", "server", "queue_ms"),
                 ("server prefill mean ms", "server", "prefill_ms")]  # fmt: skip
    first = next(iter(runs.values()))
    for label, key, sub in rows:
        cells = []
        for run in runs.values():
            value = run.get(key)
            value = value.get(sub) if isinstance(value, dict) and sub else value
            base = first.get(key)
            base = base.get(sub) if isinstance(base, dict) and sub else base
            text = "-" if value is None else f"{value:,.2f}"
            if ratio_to and value is not None and base and run is not first:
                text += f" ({value / base:.2f}x)"
            cells.append(text)
        table.add_row(label, *cells)
    return table


def _offline(mode: str, model: str, options: dict[str, Any], output, force, as_json, **run_args) -> None:
    from kiln.bench.runner import run_offline

    spec = options["workload"]
    bar, advance = _progress(spec.num_requests * (2 if run_args["backend"] == "hf" else 1), as_json)
    if bar is not None:
        bar.start()
    try:
        result = run_offline(mode, model, spec, options["engine"], progress=advance, **run_args)
    finally:
        if bar is not None:
            bar.stop()
    record = {**run_args, **{k: v for k, v in vars(spec).items()}, **options["engine"], "model": model}
    record["engine_resolved"] = result.engine
    record["dataset"] = str(spec.dataset) if spec.dataset else None
    _finish(mode, result, record, output, force, as_json)


@bench_app.command("throughput")
def throughput_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    num_requests: int = NUM_REQUESTS,
    input_len: int = INPUT_LEN,
    output_len: int = OUTPUT_LEN,
    len_std: float = LEN_STD,
    dataset: Path | None = DATASET,
    seed: int = SEED,
    ignore_eos: bool = IGNORE_EOS,
    warmup: int = typer.Option(0, "--warmup", help="Requests run first, not measured."),
    backend: str = typer.Option("kiln", "--backend", help="kiln, or hf: also run transformers generate."),
    hf_batch_size: int = typer.Option(64, "--hf-batch-size"),
    dummy_weights: bool = DUMMY,
    preset: str | None = PRESET,
    dummy_quantization: str | None = DUMMY_QUANT,
    dtype: str | None = typer.Option(None, "--dtype"),
    device: str | None = typer.Option(None, "--device"),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size"),
    max_num_tokens: int | None = typer.Option(None, "--max-num-tokens"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len"),
    kv_cache_dtype: str | None = typer.Option(None, "--kv-cache-dtype"),
    tp_size: int | None = TP_SIZE,
    pp_size: int | None = PP_SIZE,
    async_scheduling: bool | None = ASYNC_SCHEDULING,
    output: Path | None = OUTPUT,
    force: bool = FORCE,
    as_json: bool = AS_JSON,
) -> None:
    """Offline throughput: every request submitted at once through the engine."""
    if backend not in ("kiln", "hf"):
        raise UserInputError(f"--backend must be kiln or hf, got {backend!r}")
    engine = _engine_options(
        dtype=dtype,
        device=device,
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        max_seq_len=max_seq_len,
        kv_cache_dtype=kv_cache_dtype,
        tp_size=tp_size,
        pp_size=pp_size,
        async_scheduling=async_scheduling,
    )
    options = {"workload": _workload(num_requests, input_len, output_len, len_std, dataset, seed), "engine": engine}
    _offline(
        "throughput",
        model,
        options,
        output,
        force,
        as_json,
        dummy_preset=_dummy(model, dummy_weights, preset),
        dummy_quantization=dummy_quantization,
        ignore_eos=ignore_eos,
        warmup=warmup,
        batch_size=1,
        backend=backend,
        hf_batch_size=hf_batch_size,
    )


@bench_app.command("latency")
def latency_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    batch_size: int = typer.Option(1, "--batch-size", help="Requests per fixed batch."),
    num_requests: int = typer.Option(8, "--num-requests"),
    input_len: int = INPUT_LEN,
    output_len: int = typer.Option(256, "--output-len"),
    seed: int = SEED,
    ignore_eos: bool = IGNORE_EOS,
    warmup: int = typer.Option(1, "--warmup"),
    backend: str = typer.Option("kiln", "--backend"),
    dummy_weights: bool = DUMMY,
    preset: str | None = PRESET,
    dummy_quantization: str | None = DUMMY_QUANT,
    dtype: str | None = typer.Option(None, "--dtype"),
    device: str | None = typer.Option(None, "--device"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len"),
    kv_cache_dtype: str | None = typer.Option(None, "--kv-cache-dtype"),
    tp_size: int | None = TP_SIZE,
    pp_size: int | None = PP_SIZE,
    async_scheduling: bool | None = ASYNC_SCHEDULING,
    output: Path | None = OUTPUT,
    force: bool = FORCE,
    as_json: bool = AS_JSON,
) -> None:
    """Latency: fixed batches (batch 1 by default), prefill and per-token latency."""
    engine = _engine_options(
        dtype=dtype,
        device=device,
        max_seq_len=max_seq_len,
        kv_cache_dtype=kv_cache_dtype,
        tp_size=tp_size,
        pp_size=pp_size,
        async_scheduling=async_scheduling,
    )
    options = {"workload": _workload(num_requests, input_len, output_len, 0.0, None, seed), "engine": engine}
    _offline(
        "latency",
        model,
        options,
        output,
        force,
        as_json,
        dummy_preset=_dummy(model, dummy_weights, preset),
        dummy_quantization=dummy_quantization,
        ignore_eos=ignore_eos,
        warmup=warmup,
        batch_size=batch_size,
        backend=backend,
        hf_batch_size=batch_size,
    )


def _dummy(model: str, dummy_weights: bool, preset: str | None) -> str | None:
    if preset is not None and not dummy_weights:
        raise UserInputError("--preset goes with --dummy-weights")
    return (preset or model) if dummy_weights else None


@bench_app.command("serve")
def serve_command(
    url: str = typer.Option(..., "--url", help="Base URL of an OpenAI-compatible server."),
    model: str | None = typer.Option(None, "--model", help="Model name to request [default: the server's only one]."),
    concurrency: str = typer.Option("8", "--concurrency", help="In-flight requests; a list sweeps, e.g. 1,8,64."),
    request_rate: float | None = typer.Option(None, "--request-rate", help="Poisson arrivals per second."),
    num_requests: int = NUM_REQUESTS,
    input_len: int = INPUT_LEN,
    output_len: int = OUTPUT_LEN,
    len_std: float = LEN_STD,
    dataset: Path | None = DATASET,
    seed: int = SEED,
    ignore_eos: bool = IGNORE_EOS,
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Model dir whose tokenizer reads text datasets."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="For synthetic token ids [default: 32000]."),
    slo_ttft_ms: float | None = typer.Option(None, "--slo-ttft-ms"),
    slo_tpot_ms: float | None = typer.Option(None, "--slo-tpot-ms"),
    warmup: int = typer.Option(
        1, "--warmup", min=0, help="Requests sent first, one at a time, not measured (the client's first use)."
    ),
    api_key: str = typer.Option("none", "--api-key", envvar="KILN_API_KEY"),
    client: str = typer.Option(
        "http", "--client", help="http: SSE lines read with aiohttp (as vLLM's benchmark); openai: the official SDK."
    ),
    output: Path | None = OUTPUT,
    force: bool = FORCE,
    as_json: bool = AS_JSON,
) -> None:
    """Load against a running server: TTFT, TPOT, ITL, E2E, throughput and goodput."""
    from kiln.bench.runner import run_serve

    try:
        levels = [int(c) if c.strip() not in ("", "0", "inf") else None for c in concurrency.split(",")]
    except ValueError as exc:
        raise UserInputError(f"--concurrency takes integers like 1,8,64 (got {concurrency!r})") from exc
    from kiln.bench.serve_client import CLIENTS

    if client not in CLIENTS:
        raise UserInputError(f"--client must be one of {', '.join(CLIENTS)} (got {client!r})")
    spec = _workload(num_requests, input_len, output_len, len_std, dataset, seed)
    bar, advance = _progress(num_requests * len(levels), as_json)
    if bar is not None:
        bar.start()
    try:
        result = run_serve(
            url,
            model,
            spec,
            tokenizer,
            vocab_size,
            concurrencies=levels,
            request_rate=request_rate,
            ignore_eos=ignore_eos,
            api_key=api_key,
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            warmup=warmup,
            progress=advance,
            client=client,
        )
    finally:
        if bar is not None:
            bar.stop()
    record = {
        "url": url,
        "client": client,
        "warmup": warmup,
        "model": model,
        "concurrency": levels,
        "request_rate": request_rate,
        **vars(spec),
        "dataset": str(dataset) if dataset else None,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
    }
    _finish("serve", result, record, output, force, as_json)


@bench_app.command("compare")
def compare_command(reports: list[Path] = typer.Argument(..., help="Report directories.")) -> None:
    """Reports side by side, with ratios to the first."""
    from kiln.bench.report import validate_report

    runs = {}
    for path in reports:
        for name, run in validate_report(path)["runs"].items():
            runs[f"{path.name}:{name}"] = run
    stdout_console.print(summary_table("comparison (ratios to the first column)", runs, ratio_to="first"))
