"""Buffers in every tensor-parallel GPU's memory that the others write into (PyTorch symmetric memory).

`kernels/triton_peer_reduce.py` sums a row-parallel layer's partial outputs through them and applies the next
residual add and RMSNorm in the same kernel: at decode sizes that replaces an NCCL all-reduce and a norm
kernel. Only for ranks on one machine whose GPUs reach each other's memory (NVLink or PCIe peer access);
elsewhere, and for more rows than the buffers hold, the layers use NCCL as before.

Opening them is collective: every rank of the group calls `open_peer_buffers` at the same point (when the
rank joins its group, before the model is built). KILN_DISABLE_PEER_ALL_REDUCE=1 keeps NCCL everywhere (A/B);
KILN_PEER_REDUCE=lamport also opens the buffers of the kernel's variant without flags (16-bit activations;
not yet run on a GPU).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MAX_ROWS = 64  # token rows one call sums; NCCL's bandwidth wins on bigger batches (docs/benchmarks.md)
ROW_BYTES = 32768  # bytes of one row the buffers hold: a hidden size of 16,384 in bf16 (Llama-3-70B: 8,192)


@dataclass(frozen=True)
class PeerBuffers:
    """This rank's handles on the group's symmetric buffers (what the Triton kernel takes)."""

    rank: int
    world: int
    max_rows: int
    data_addresses: torch.Tensor  # [world] int64: each rank's data buffer, [2, world, max_rows, ROW_BYTES] bytes
    flag_addresses: torch.Tensor  # [world] int64: each rank's flags, [world, max_rows] int32
    epochs: torch.Tensor  # [max_rows] int32: this rank's calls so far per row
    lamport_addresses: torch.Tensor | None  # [world] int64: [3, world, max_rows, ROW_BYTES] bytes, -0.0 when unwritten
    lamport_slots: torch.Tensor | None  # [max_rows] int32: the slot (0, 1, 2) of each row's last call
    timeout_ns: int  # a peer silent this long is gone: the kernel traps (a CUDA error) instead of spinning on
    keep_alive: tuple = ()  # the symmetric tensors, so their memory lives as long as these handles

    def covers(self, x: torch.Tensor) -> bool:
        """Whether x, a [rows, hidden] partial sum on this rank's GPU, fits the buffers."""
        return (
            x.dim() == 2
            and 0 < x.shape[0] <= self.max_rows
            and x.shape[1] * x.element_size() <= ROW_BYTES
            and x.stride(1) == 1
            and x.device == self.epochs.device
        )


def open_peer_buffers(group: dist.ProcessGroup, timeout_s: float) -> PeerBuffers | None:
    """The group's peer buffers, or None where they cannot be used (the layers then use NCCL). Collective.

    timeout_s: the group's collective timeout. A kernel that waited this long for a peer traps: a dead peer must
    not leave the GPU spinning, which would also hold up this process's exit (NCCL's abort cannot stop it).
    """
    if os.environ.get("KILN_DISABLE_PEER_ALL_REDUCE") == "1" or dist.get_backend(group) != "nccl":
        return None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = torch.device("cuda", torch.cuda.current_device())
    places: list[tuple[str, int] | None] = [None] * world
    dist.all_gather_object(places, (socket.gethostname(), device.index), group=group)
    if len({host for host, _ in places}) > 1:
        return None  # ranks on several machines: no shared memory between them
    reachable = all(other == device.index or torch.cuda.can_device_access_peer(device, other) for _, other in places)
    if not _every_rank(reachable, group):
        logger.warning("tensor-parallel all-reduces stay on NCCL: these GPUs cannot access each other's memory")
        return None
    opened = False
    try:
        import torch.distributed._symmetric_memory as symm_mem

        data = symm_mem.empty(2 * world * MAX_ROWS * ROW_BYTES, dtype=torch.uint8, device=device)
        flags = symm_mem.empty(world * MAX_ROWS, dtype=torch.int32, device=device)
        flags.zero_()  # before the rendezvous's barrier: no peer raises a flag before every flag is 0
        torch.cuda.synchronize(device)
        data_handle = symm_mem.rendezvous(data, group.group_name)
        flag_handle = symm_mem.rendezvous(flags, group.group_name)
        lamport = None
        if os.environ.get("KILN_PEER_REDUCE") == "lamport":
            lamport = _open_lamport(symm_mem, world, device, group)
        opened = True
    except Exception as exc:  # noqa: BLE001 - an old driver, no symmetric memory: NCCL still works
        logger.warning("tensor-parallel all-reduces stay on NCCL: peer buffers failed (%s)", exc)
    if not _every_rank(opened, group):  # one rank on the fused kernel and another on NCCL would hang both
        return None
    return PeerBuffers(
        rank=rank,
        world=world,
        max_rows=MAX_ROWS,
        data_addresses=torch.tensor(data_handle.buffer_ptrs, dtype=torch.int64, device=device),
        flag_addresses=torch.tensor(flag_handle.buffer_ptrs, dtype=torch.int64, device=device),
        epochs=torch.zeros(MAX_ROWS, dtype=torch.int32, device=device),
        lamport_addresses=None if lamport is None else lamport[0],
        lamport_slots=None if lamport is None else torch.zeros(MAX_ROWS, dtype=torch.int32, device=device),
        timeout_ns=int(timeout_s * 1e9),
        keep_alive=(data, flags, data_handle, flag_handle, lamport),
    )


def _open_lamport(symm_mem, world: int, device: torch.device, group: dist.ProcessGroup):
    """(addresses, buffer, handle) of the buffers of the kernel's variant without flags, every 16-bit element
    -0.0 (0x8000: not yet written) before any peer can write into them (the rendezvous waits for every rank)."""
    buffer = symm_mem.empty(3 * world * MAX_ROWS * ROW_BYTES, dtype=torch.uint8, device=device)
    buffer.view(torch.int16).fill_(-32768)
    torch.cuda.synchronize(device)
    handle = symm_mem.rendezvous(buffer, group.group_name)
    return torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device), buffer, handle


def _every_rank(this_rank: bool, group: dist.ProcessGroup) -> bool:
    """Whether every rank of the group answered True (collective; also a barrier)."""
    answers: list[bool | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(answers, this_rank, group=group)
    return all(answers)
