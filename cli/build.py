"""`kiln build CKPT -o ENGINE`: flags (over a --config YAML) -> BuildSpec -> plan -> engine artifact."""

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kiln.cli.console import print_artifact_json, stderr_console, stdout_console
from kiln.core.errors import UserInputError
from kiln.core.stage_options import resolve_options

# Options a --config YAML file may set; flags given on the command line win over the file.
BUILD_DEFAULTS: dict[str, Any] = {
    "max_batch_size": None,
    "max_num_tokens": None,
    "max_seq_len": None,
    "kv_cache_dtype": "auto",
    "kv_block_size": 16,
    "kv_cache_memory_fraction": 0.9,
    "tp_size": 1,
    "pp_size": 1,
    "target_gpu": "auto",
    "cuda_graph_batch_sizes": None,
}


def parse_batch_sizes(value: Any) -> tuple[int, ...] | None:
    """'1,2,4,8' or a YAML list -> (1, 2, 4, 8)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        return tuple(int(str(item).strip()) for item in items if str(item).strip())
    except ValueError as exc:
        raise UserInputError(f"--cuda-graph-batch-sizes takes integers like 1,2,4,8 (got {value!r})") from exc


def build_command(
    source: str = typer.Argument(..., help="Checkpoint artifact or Hugging Face model directory."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Engine directory to write."),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size", help="[default: 256 GPU, 32 CPU]"),
    max_num_tokens: int | None = typer.Option(None, "--max-num-tokens", help="Tokens per step [default: 8192 / 2048]."),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="[default: the model's context]"),
    kv_cache_dtype: str | None = typer.Option(None, "--kv-cache-dtype", help="auto|bf16|fp16|fp32|fp8 [auto]."),
    kv_block_size: int | None = typer.Option(None, "--kv-block-size", help="Tokens per KV block [default: 16]."),
    kv_cache_memory_fraction: float | None = typer.Option(
        None, "--kv-cache-memory-fraction", help="Of the GPU's memory, for weights, activations and KV [default: 0.9]."
    ),
    tp_size: int | None = typer.Option(None, "--tp-size", help="Tensor-parallel ranks [default: 1]."),
    pp_size: int | None = typer.Option(
        None, "--pp-size", help="Pipeline stages the engine runs with by default [default: 1]."
    ),
    target_gpu: str | None = typer.Option(None, "--target-gpu", help="auto|h100-80gb|h200|a100-80gb|l40s|cpu|..."),
    cuda_graph_batch_sizes: str | None = typer.Option(
        None, "--cuda-graph-batch-sizes", help="Decode batch sizes to capture, e.g. 1,2,4,8 [default: buckets]."
    ),
    dummy_weights: bool = typer.Option(False, "--dummy-weights", help="Random weights (SOURCE: a config.json)."),
    preset: str | None = typer.Option(None, "--preset", help="Architecture for --dummy-weights, e.g. llama-3-8b."),
    dummy_quantization: str | None = typer.Option(None, "--dummy-quantization", help="fp8 or int4-awq dummy weights."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of these options; flags override it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan only; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Plan memory for a target GPU and build an engine: runtime-layout weights, plan and fingerprint."""
    from kiln.build.stage import BuildSpec, build
    from kiln.runtime.model_dir import resolve_model_dir

    flags = {key: value for key, value in locals().items() if key in BUILD_DEFAULTS}
    options = resolve_options(BUILD_DEFAULTS, flags, config)
    options["cuda_graph_batch_sizes"] = parse_batch_sizes(options["cuda_graph_batch_sizes"])
    if dummy_weights:
        from kiln.runtime.model_dir import resolve_dummy_model

        source_dir = resolve_dummy_model(preset or source, dummy_quantization)
    else:
        source_dir = resolve_model_dir(source)
    spec = BuildSpec(
        source=source_dir, output=output, dry_run=dry_run, force=force, dummy_weights=dummy_weights, **options
    )
    with stderr_console.status(f"building {source}"):
        plan, artifact = build(spec)
    if as_json:
        if artifact is None:
            report = {"plan": plan.memory.to_dict(), "target": plan.target.to_dict(), "options": dict(options)}
            typer.echo(json.dumps(report, indent=2))
        else:
            print_artifact_json(artifact)
        return
    stdout_console.print(plan_table(plan))
    if artifact is not None:
        size = sum(entry.bytes for entry in artifact.manifest.files)
        stdout_console.print(f"[green]wrote[/] engine {artifact.path} ({size / 1e6:.1f} MB)", highlight=False)


def plan_table(plan: Any) -> Table:
    """The memory plan as people read it."""
    gib = 2**30
    memory, request = plan.memory, plan.request
    where = f"per rank of {request.tp_size}"
    if request.pp_size > 1:
        where += f", stage {memory.stage} of {request.pp_size} (the one with the fewest KV blocks)"
    table = Table(title=f"plan for {plan.target.name} ({plan.target.arch}), {where}")
    table.add_column("item")
    table.add_column("value", justify="right")
    rows = [
        ("device memory", f"{memory.memory_bytes / gib:.1f} GiB"),
        ("weights", f"{memory.weight_bytes / gib:.2f} GiB"),
        ("activation peak", f"{memory.activation_peak_bytes / gib:.2f} GiB"),
        ("reserved (context, workspaces, graphs)", f"{memory.reserved_bytes / gib:.2f} GiB"),
        (f"KV cache ({request.kv_cache_dtype})", f"{memory.kv_budget_bytes / gib:.2f} GiB"),
        ("KV bytes per token", f"{memory.kv_bytes_per_token:,}"),
        (f"KV blocks of {request.block_size} tokens", f"{memory.num_kv_blocks - 1:,}"),
        (f"max concurrency at max_seq_len {request.max_seq_len}", f"{memory.max_concurrency:,.2f}"),
        ("max batch size / tokens per step", f"{request.max_batch_size} / {request.max_num_tokens}"),
    ]
    for item, value in rows:
        table.add_row(item, value)
    return table
