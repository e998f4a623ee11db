"""Fixtures of the server tests: a live server on the tiny model (tests/conftest.py has the checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer, start_server, stop_server


@pytest.fixture(scope="module")
def server(serve_checkpoint: Path) -> Iterator[LiveServer]:
    live = start_server(serve_checkpoint, "--max-batch-size", "16")
    yield live
    stop_server(live)
