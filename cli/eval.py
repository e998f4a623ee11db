"""`kiln eval MODEL [--compare OTHER]`: perplexity on held-out text, and drift of a second model from the first."""

import json
import time
from typing import Any

import typer
from rich.table import Table

from kiln.cli.console import stderr_console, stdout_console


def eval_command(
    model: str = typer.Argument(..., help="Checkpoint artifact, Hugging Face model directory, or builtin:NAME."),
    data: str = typer.Option(
        "builtin", "--data", help="builtin (held-out text shipped with kiln), a .txt file, or JSONL with 'text'."
    ),
    compare: str | None = typer.Option(
        None, "--compare", help="A second model (same tokenizer): adds its perplexity, KL(MODEL || OTHER), top-1."
    ),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    max_windows: int = typer.Option(16, "--max-windows", help="Most windows to score (fewer if the text is short)."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto|bf16|fp16|fp32 (auto = each checkpoint's dtype)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Measure perplexity on a text; with --compare, also KL divergence and top-1 agreement between two models."""
    from kiln.quantize.evaluate import evaluate
    from kiln.runtime.engine_config import resolve_device
    from kiln.runtime.model_dir import resolve_model_source

    resolved_device = resolve_device(device)
    model_dir = resolve_model_source(model)
    compare_dir = resolve_model_source(compare) if compare is not None else None
    start = time.perf_counter()
    with stderr_console.status(f"evaluating {model}" + (f" against {compare}" if compare else "")):
        report = evaluate(
            model_dir,
            data=data,
            compare_dir=compare_dir,
            seq_len=seq_len,
            max_windows=max_windows,
            device=resolved_device,
            dtype=None if dtype == "auto" else dtype,
        )
    seconds = time.perf_counter() - start
    result = {
        "model": model,
        "model_dir": str(model_dir),
        "compare": compare,
        "compare_dir": str(compare_dir) if compare_dir is not None else None,
        "device": str(resolved_device),
        "dtype": dtype,
        "seconds": round(seconds, 3),
        **report.to_dict(),
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        stdout_console.print(_table(result))


def _table(result: dict[str, Any]) -> Table:
    table = Table(title="evaluation", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("model", result["model"])
    table.add_row("data", f"{result['data_source']} ({result['data_digest'][:23]}…)")
    table.add_row("windows", f"{result['num_windows']} x {result['seq_len']} tokens ({result['num_tokens']:,} scored)")
    table.add_row("perplexity", f"{result['ppl']:.4f}")
    if result["compare"] is not None:
        table.add_row("compared with", result["compare"])
        table.add_row("its perplexity", f"{result['ppl_other']:.4f} ({result['ppl_increase_pct']:+.2f}%)")
        table.add_row("KL divergence", f"{result['kl']:.6f} nats/token")
        table.add_row("top-1 agreement", f"{result['top1_agreement']:.2%}")
    table.add_row("run", f"{result['device']}, dtype {result['dtype']}, {result['seconds']:.1f}s")
    return table
