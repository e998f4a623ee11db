"""Fixtures of the server tests: the tiny model as an fp32 checkpoint, and a live server on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer, start_server, stop_server

from kiln.convert.stage import ConvertSpec, convert


@pytest.fixture(scope="session")
def serve_checkpoint(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "tiny"
    convert(ConvertSpec(source=str(tiny_llama_dir), output=out, dtype="fp32"))
    return out


@pytest.fixture(scope="module")
def server(serve_checkpoint: Path) -> Iterator[LiveServer]:
    live = start_server(serve_checkpoint, "--max-batch-size", "16")
    yield live
    stop_server(live)
