"""The all-reduce fused with add + RMSNorm over peer GPU memory (kernels/triton_peer_reduce.py), on 2 GPUs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
WORKER = Path(__file__).parents[1] / "peer_reduce_worker.py"


# "flags": the default kernel; "lamport": KILN_PEER_REDUCE=lamport, the variant whose data is its own signal.
PROTOCOLS = ["flags", "lamport"]


def _run(mode: str, protocol: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, str(WORKER), "2", str(tmp_path / "init"), mode, protocol]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sums_equal_nccl_then_the_norm_bit_for_bit_eagerly_and_in_graph_replays(tmp_path: Path, protocol: str) -> None:
    # Rows 1..64 in a changing order (per-row call counts diverge), without a residual too, then a CUDA graph of
    # six calls replayed three times with new inputs: every rank's outputs equal NCCL's sum + the norm kernel.
    done = _run("check", protocol, tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_peer_that_never_comes_ends_in_an_error_not_a_hang(tmp_path: Path, protocol: str) -> None:
    # Rank 0 calls the kernel with a 2 s limit; rank 1 stays alive but never calls. The kernel must trap.
    started = time.monotonic()
    done = _run("alone", protocol, tmp_path, timeout=120)
    assert "kernel failed after" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - started < 100
