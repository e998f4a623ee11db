"""Calling the `kiln` command in-process, as tests do (imported as `cli_runner`)."""

import pytest

from kiln.cli.main import main


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `kiln ARGS`; returns (exit code, stdout, stderr with rich's line wrapping undone)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())
