"""`kiln run` under torchrun (CPU, gloo): one node or two, rank 0 answers alone, the others serve it and exit 0."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = ["-m", "kiln.cli.main", "run"]
GENERATION = ["--device", "cpu", "-p", "hello there", "--temperature", "0", "--max-tokens", "8", "--ignore-eos"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _tokens(stdout: str) -> list[int]:
    return json.loads(stdout)["results"][0]["token_ids"]


@pytest.fixture(scope="module")
def one_process_tokens(serve_checkpoint: Path) -> list[int]:
    done = subprocess.run([sys.executable, *RUN, str(serve_checkpoint), *GENERATION, "--json"],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return _tokens(done.stdout)


@pytest.mark.parametrize(
    "sizes,processes",
    [(["--tp-size", "2"], 2), (["--pp-size", "2"], 2), (["--tp-size", "2", "--pp-size", "2"], 4)],
    ids=["tp2", "pp2", "pp2-tp2"],
)
def test_one_node_gives_the_tokens_of_one_process(serve_checkpoint, one_process_tokens, sizes, processes) -> None:
    command = _torchrun("--nnodes", "1", "--nproc-per-node", str(processes), "--master-port", str(_free_port()))
    done = subprocess.run([*command, *RUN, str(serve_checkpoint), *GENERATION, *sizes, "--json"],
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert _tokens(done.stdout) == one_process_tokens  # one JSON document: only rank 0 printed


def test_two_nodes_give_the_tokens_of_one_and_the_second_prints_nothing(serve_checkpoint, one_process_tokens) -> None:
    # Two torchrun agents on this machine stand for two nodes: the group forms over TCP from the master
    # address, steps travel over gloo (no shared memory between nodes).
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            [
                *_torchrun(
                    "--nnodes",
                    "2",
                    "--node-rank",
                    str(rank),
                    "--nproc-per-node",
                    "1",
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    port,
                ),
                *RUN,
                str(serve_checkpoint),
                *GENERATION,
                "--tp-size",
                "2",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert _tokens(outputs[0][0]) == one_process_tokens
    assert outputs[1][0] == ""


def test_a_process_count_that_is_not_the_ranks_is_refused_at_once(serve_checkpoint) -> None:
    # Every rank checks before joining the group, so none waits for a rank 0 that refused (torchrun then
    # stops the rest, which is why one message or two reach stderr).
    command = _torchrun("--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(_free_port()))
    started = time.monotonic()
    done = subprocess.run([*command, *RUN, str(serve_checkpoint), *GENERATION],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "error: torchrun started 2 processes, but --tp-size x --pp-size is 1" in done.stderr
    assert time.monotonic() - started < 60
