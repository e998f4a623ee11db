"""All-reduce latency at decode sizes, inside CUDA graphs: NCCL against PyTorch's symmetric-memory one-shot.

A tensor-parallel decode step of the Llama-3-8B shape does 64 all-reduces of [batch, 4096] bf16; at
batch 1 their latency, not their bandwidth, is what they cost. This measures both implementations
replayed from a graph of 64 back-to-back all-reduces (as a decode step holds them), checks the sums,
and prints microseconds per all-reduce. One process per GPU:

    torchrun --nproc-per-node 2 scripts/allreduce_latency.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

HIDDEN = 4096
CALLS = 64  # all-reduces per decode step of Llama-3-8B (two per layer)


def _timed(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / repeats / CALLS  # microseconds per all-reduce


def _calls(name: str, x: torch.Tensor, staged: torch.Tensor, out: torch.Tensor, group_name: str) -> None:
    """CALLS all-reduces of x into out, by NCCL or through the symmetric buffer `staged`."""
    for _ in range(CALLS):
        if name == "nccl":
            out.copy_(x)
            dist.all_reduce(out)
        else:
            staged.copy_(x)
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", group_name, out)


def main() -> None:
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group_name = dist.group.WORLD.group_name
    buffer = symm_mem.empty(256 * HIDDEN, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(buffer, group_name)
    for batch in (1, 8, 32, 64, 256):
        x = torch.full((batch, HIDDEN), float(rank + 1), dtype=torch.bfloat16, device=device)
        expected = size * (size + 1) / 2
        results = {}
        for name in ("nccl", "symm_mem one-shot"):
            staged = buffer[: batch * HIDDEN].view(batch, HIDDEN)
            out = torch.empty_like(x)
            _calls(name, x, staged, out, group_name)  # eager warm-up: set-up happens outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _calls(name, x, staged, out, group_name)
            micros = _timed(graph)
            correct = bool(torch.all(out == expected))
            results[name] = f"{micros:6.1f} us {'ok' if correct else 'WRONG'}"
        if rank == 0:
            print(f"batch {batch:4d}: " + "  ".join(f"{k}: {v}" for k, v in results.items()), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
