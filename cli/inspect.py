"""`kiln inspect DIR`: a manifest as readable tables, optionally checking every file's sha256."""

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kiln.cli.console import stdout_console
from kiln.core.artifact import find_file_problems
from kiln.core.errors import ArtifactError
from kiln.core.manifest import MANIFEST_NAME, Manifest, manifest_digest, parse_manifest


def inspect_command(
    artifact_dir: Path = typer.Argument(..., help="An artifact directory (checkpoint, engine, bench report)."),
    verify: bool = typer.Option(False, "--verify", help="Check every file's sha256, not only its size."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and the check as JSON on stdout."),
) -> None:
    """Show an artifact's manifest; exits non-zero if a file is missing, truncated or modified."""
    manifest_path = artifact_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{artifact_dir} has no {MANIFEST_NAME}; it is not a kiln artifact")
    text = manifest_path.read_text(encoding="utf-8")
    manifest = parse_manifest(text, str(manifest_path))
    problems = find_file_problems(artifact_dir, manifest, verify=verify)
    if as_json:
        report = {
            "path": str(artifact_dir),
            "manifest_digest": manifest_digest(text),
            "verified_sha256": verify,
            "ok": not problems,
            "problems": problems,
            "manifest": manifest.to_dict(),
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_tables(artifact_dir, manifest, manifest_digest(text), problems, verify)
    if problems:
        raise ArtifactError(f"{artifact_dir} is damaged: " + "; ".join(problems))


def _print_tables(path: Path, manifest: Manifest, digest: str, problems: list[str], verify: bool) -> None:
    overview = _key_value_table(f"{manifest.kind} artifact {path}")
    overview.add_row("name", manifest.name)
    overview.add_row("kiln version", manifest.kiln_version)
    overview.add_row("schema version", str(manifest.schema_version))
    overview.add_row("created", manifest.created)
    overview.add_row("manifest digest", digest)
    if manifest.parent:
        overview.add_row("parent", f"{manifest.parent.kind}: {manifest.parent.source}")
        overview.add_row("parent digest", manifest.parent.digest)
    stdout_console.print(overview)
    for title, section in (("model", manifest.model), ("spec", manifest.spec), ("extra", manifest.extra)):
        if section:
            table = _key_value_table(title)
            for key, value in section.items():
                table.add_row(key, _format_value(value))
            stdout_console.print(table)
    stdout_console.print(_files_table(manifest, problems, verify))


def _files_table(manifest: Manifest, problems: list[str], verify: bool) -> Table:
    table = Table(title="files" + (" (sha256 checked)" if verify else " (sizes checked)"), title_justify="left")
    for column in ("path", "bytes", "sha256", "status"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for entry in manifest.files:
        problem = next((p for p in problems if p.startswith(entry.path + " ")), None)
        status = f"[red]{_short_status(problem)}[/]" if problem else "[green]ok[/]"
        table.add_row(entry.path, f"{entry.bytes:,}", entry.sha256[:16] + "…", status)
    return table


def _short_status(problem: str) -> str:
    """A word for the files table; the full sentence goes in the error line."""
    if problem.endswith("is missing"):
        return "MISSING"
    if "sha256" in problem:
        return "MODIFIED"
    return "SIZE DIFFERS"


def _key_value_table(title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    return table


def _format_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)
