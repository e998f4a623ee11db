"""A GPU rank for tests/kernels/test_peer_reduce.py (a module of its own so spawned processes can import it).

Each check builds every rank's partial sums from seeds, so each rank can compute the expected result itself:
NCCL's two-rank sum (one rounding of the fp32 sum) followed by the add + RMSNorm kernel the layers use
otherwise. The fused kernel must match it bit for bit, on every rank.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

HIDDEN = 4096
EPS = 1e-5


def _partial(rank: int, call: int, rows: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(1000 * call + rank)
    return torch.randn(rows, HIDDEN, generator=gen, device=device).to(torch.bfloat16)


def _expected(call: int, rows: int, world: int, residual, weight) -> tuple[torch.Tensor, torch.Tensor]:
    from kiln.kernels.triton_fused_ops import fused_add_rms_norm

    device = weight.device
    total = sum(_partial(r, call, rows, device).float() for r in range(world)).to(torch.bfloat16)
    return fused_add_rms_norm(total, residual, weight, EPS)


def _check_eager(rank: int, world: int, peers, device: torch.device) -> None:
    from kiln.kernels.triton_peer_reduce import peer_reduce_add_rms_norm

    torch.manual_seed(7)  # the same weight and residuals on every rank, as the engine's replicated norms
    weight = torch.rand(HIDDEN, device="cpu").to(device, torch.bfloat16) + 0.5
    # Rows change between calls, so rows' call counts differ (1 and 2 run more often than 64).
    for call, rows in enumerate([1, 1, 3, 64, 1, 2, 2, 64, 1, 5, 1]):
        residual = None if call % 4 == 3 else torch.randn(rows, HIDDEN).to(device, torch.bfloat16)
        out, new_residual = peer_reduce_add_rms_norm(_partial(rank, call, rows, device), residual, weight, EPS, peers)
        want_out, want_residual = _expected(call, rows, world, residual, weight)
        assert torch.equal(out, want_out), f"rank {rank} call {call} ({rows} rows): normed output differs"
        assert torch.equal(new_residual, want_residual), f"rank {rank} call {call}: residual differs"


def _check_graph(rank: int, world: int, peers, device: torch.device) -> None:
    """Calls captured once in a CUDA graph, replayed with new inputs: the epochs advance in the replays."""
    from kiln.kernels.triton_peer_reduce import peer_reduce_add_rms_norm

    torch.manual_seed(8)
    weight = torch.rand(HIDDEN).to(device, torch.bfloat16) + 0.5
    rows, calls = 4, 6
    inputs = [torch.zeros(rows, HIDDEN, device=device, dtype=torch.bfloat16) for _ in range(calls)]
    residual = torch.randn(rows, HIDDEN).to(device, torch.bfloat16)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the capture (compiles the kernel)
        peer_reduce_add_rms_norm(inputs[0], residual, weight, EPS, peers)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [peer_reduce_add_rms_norm(x, residual, weight, EPS, peers) for x in inputs]
    for replay in range(3):
        for i, x in enumerate(inputs):
            x.copy_(_partial(rank, 100 + 10 * replay + i, rows, device))
        graph.replay()
        torch.cuda.synchronize(device)
        for i, (out, new_residual) in enumerate(outputs):
            want_out, want_residual = _expected(100 + 10 * replay + i, rows, world, residual, weight)
            assert torch.equal(out, want_out), f"rank {rank} replay {replay} call {i}: normed output differs"
            assert torch.equal(new_residual, want_residual), f"rank {rank} replay {replay} call {i}: residual"


def run_rank(rank: int, world: int, init_file: str, mode: str, protocol: str) -> None:
    """mode "check": the eager and graph checks; "alone": rank 0 calls the kernel while its peer never does.
    protocol: "flags" (the default kernel) or "lamport" (KILN_PEER_REDUCE=lamport)."""
    from kiln.models.peer_all_reduce import open_peer_buffers

    if protocol == "lamport":
        os.environ["KILN_PEER_REDUCE"] = "lamport"

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=device)
    peers = open_peer_buffers(dist.group.WORLD, timeout_s=60.0)
    assert peers is not None, "peer buffers did not open on GPUs of one machine"
    assert (peers.lamport_addresses is not None) == (protocol == "lamport")
    if mode == "check":
        _check_eager(rank, world, peers, device)
        _check_graph(rank, world, peers, device)
        dist.barrier()
        dist.destroy_process_group()
        return
    # "alone": a peer that never arrives must end in an error within the kernel's limit, never a hang.
    from dataclasses import replace

    from kiln.kernels.triton_peer_reduce import peer_reduce_add_rms_norm

    if rank == 0:
        weight = torch.ones(HIDDEN, device=device, dtype=torch.bfloat16)
        started = time.monotonic()
        try:
            peer_reduce_add_rms_norm(_partial(0, 0, 1, device), None, weight, EPS, replace(peers, timeout_ns=2 * 10**9))
            torch.cuda.synchronize(device)
        except RuntimeError as exc:
            print(f"kernel failed after {time.monotonic() - started:.1f} s: {exc}", flush=True)
            os._exit(3)
        os._exit(0)  # the kernel returned: the test fails on this exit code
    time.sleep(30)  # alive but never calling, then gone
    os._exit(0)


if __name__ == "__main__":
    world_size, init, how, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.multiprocessing.spawn(run_rank, args=(world_size, init, how, kind), nprocs=world_size, join=True)
