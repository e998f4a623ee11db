"""Where the CLI writes: results to stdout, progress and errors to stderr (so --json output stays clean)."""

import json
import logging
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

stdout_console = Console()
stderr_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    """Kiln's INFO lines (DEBUG with --verbose) on stderr; library chatter stays at WARNING."""
    handler = RichHandler(console=stderr_console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("kiln").setLevel(logging.DEBUG if verbose else logging.INFO)
    # transformers prints progress bars and advice on every GGUF/tokenizer load; keep the terminal readable.
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# The command line of this invocation, as the user typed it (set by cli.main; bench reports record it).
INVOCATION: list[str] = []


def print_artifact_json(artifact: Any) -> None:
    """The --json result of a stage that wrote an artifact: its path, manifest digest and manifest."""
    report = {"output": str(artifact.path), "manifest_digest": artifact.digest, "manifest": artifact.manifest.to_dict()}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


def print_error(message: str) -> None:
    """One red line on stderr."""
    stderr_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
