"""`kiln convert SRC -o OUT`: flags -> ConvertSpec -> convert stage."""

import re
from pathlib import Path

import typer

from kiln.cli.console import print_artifact_json, stderr_console, stdout_console
from kiln.core.errors import UserInputError
from kiln.core.stage_options import resolve_options

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'2GB', '500MiB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise UserInputError(f"cannot read size {text!r}: write e.g. 2GB, 500MiB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


# Options a --config YAML file may set; flags given on the command line win over the file.
CONVERT_DEFAULTS = {"dtype": "auto", "name": None, "max_shard_size": "2GiB"}


def convert_command(
    source: str = typer.Argument(
        ..., help="HF model directory, a .gguf file, or builtin:NAME (e.g. builtin:smollm2-135m)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto|bf16|fp16|fp32 [default: auto = the source's]."),
    name: str | None = typer.Option(None, "--name", help="Name recorded in the manifest."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="Largest safetensors shard [default: 2GiB]."
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML file of options (e.g. configs/convert-bf16.yaml)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Convert a Hugging Face directory or GGUF file into a kiln checkpoint artifact."""
    from kiln.convert.stage import ConvertSpec, convert  # heavy imports only when the command runs

    flags = {"dtype": dtype, "name": name, "max_shard_size": max_shard_size}
    options = resolve_options(CONVERT_DEFAULTS, flags, config)
    if options["dtype"] not in ("auto", "bf16", "fp16", "fp32"):
        raise UserInputError(f"--dtype must be one of auto, bf16, fp16, fp32 (got {options['dtype']!r})")
    spec = ConvertSpec(
        source=source,
        output=output,
        dtype=options["dtype"],
        name=options["name"],
        force=force,
        max_shard_bytes=parse_size(str(options["max_shard_size"])),
    )
    with stderr_console.status(f"converting {source}"):
        artifact = convert(spec)
    if as_json:
        print_artifact_json(artifact)
        return
    model = artifact.manifest.model
    total_bytes = sum(entry.bytes for entry in artifact.manifest.files)
    stdout_console.print(
        f"[green]wrote[/] {artifact.path}  {model['architecture']}, {model['num_parameters'] / 1e6:.1f}M parameters, "
        f"{model['dtype']}, {len(artifact.manifest.files)} files, {total_bytes / 1e6:.1f} MB",
        highlight=False,
    )
