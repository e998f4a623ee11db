"""Fixtures of the CLI tests."""

from pathlib import Path

import pytest

from kiln.convert.stage import ConvertSpec, convert


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama converted to a bf16 checkpoint artifact once."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    convert(ConvertSpec(source=str(tiny_llama_dir), output=out, dtype="bf16"))
    return out
