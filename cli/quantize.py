"""`kiln quantize CKPT -o OUT --format FMT`: flags -> QuantizeSpec -> quantize stage."""

from pathlib import Path

import typer

from kiln.cli.console import print_artifact_json, stderr_console, stdout_console


def quantize_command(
    source: str = typer.Argument(..., help="Checkpoint artifact, Hugging Face directory or builtin:NAME."),
    output: Path = typer.Option(..., "--output", "-o", help="Quantized checkpoint directory to write."),
    fmt: str = typer.Option(..., "--format", help="fp8 | int4-awq | int4-wo."),
    kv_cache_dtype: str | None = typer.Option(None, "--kv-cache-dtype", help="fp8: also calibrate KV-cache scales."),
    calib_data: str = typer.Option("builtin", "--calib-data", help="builtin, or a .txt / JSONL (text) file."),
    calib_size: int = typer.Option(32, "--calib-size", help="Calibration windows."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Tokens per calibration window."),
    group_size: int = typer.Option(128, "--group-size", help="INT4 group size (reduced per layer to fit)."),
    awq_clip: bool = typer.Option(
        False, "--awq-clip", help="int4-awq: also search each group's clipping (better quality; slow on a CPU)."
    ),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N."),
    max_ppl_increase: float | None = typer.Option(
        None, "--max-ppl-increase", help="Quality gate in percent [default: fp8 3, int4 15]; exit 3 beyond it."
    ),
    eval_data: str = typer.Option("builtin", "--eval-data", help="Held-out text for the quality gate."),
    eval_windows: int = typer.Option(8, "--eval-windows", help="Evaluation windows for the gate."),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="Tokens per evaluation window."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Quantize a checkpoint with NVIDIA ModelOpt; measure it against its parent and gate on quality."""
    from kiln.quantize.stage import QuantizeSpec, quantize
    from kiln.runtime.engine_config import resolve_device
    from kiln.runtime.model_dir import resolve_model_source

    spec = QuantizeSpec(
        source=resolve_model_source(source),
        output=output,
        format=fmt,
        calib_data=calib_data,
        calib_size=calib_size,
        calib_seq_len=calib_seq_len,
        group_size=group_size,
        awq_clip=awq_clip,
        kv_cache_dtype=kv_cache_dtype,
        seed=seed,
        max_ppl_increase=max_ppl_increase,
        eval_data=eval_data,
        eval_windows=eval_windows,
        eval_seq_len=eval_seq_len,
        device=str(resolve_device(device)),
        force=force,
    )
    with stderr_console.status(f"quantizing {source} to {fmt}"):
        artifact = quantize(spec)
    quality = artifact.manifest.extra["quality"]
    if as_json:
        print_artifact_json(artifact)
        return
    stdout_console.print(
        f"[green]wrote[/] {artifact.path}  {fmt}: perplexity {quality['ppl_parent']:.3f} -> {quality['ppl']:.3f} "
        f"({quality['ppl_increase_pct']:+.2f}%, gate {quality['gate_max_ppl_increase_pct']}%), "
        f"KL {quality['kl']:.4f}, top-1 agreement {quality['top1_agreement']:.3f}",
        highlight=False,
    )
