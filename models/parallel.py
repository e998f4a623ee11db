"""Tensor-parallel state of this process and the two collectives the layers need (torch.distributed).

The runtime sets the state once, before building the model (`set_tensor_parallel`); layers read it
when they are built and when they load, so a model built with world size N holds this rank's shard
of every split tensor. With a world size of 1 (the default) nothing is split and no collective runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kiln.core.errors import UserInputError
from kiln.models.peer_all_reduce import PeerBuffers


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    peers: PeerBuffers | None = None  # GPUs of one machine: sums fused with the next norm (peer_all_reduce)

    def split(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, channels), which must divide evenly."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {self.size}")
        return total // self.size


_STATE = TensorParallel()


def tensor_parallel() -> TensorParallel:
    """The state layers read."""
    return _STATE


def set_tensor_parallel(
    rank: int, size: int, group: dist.ProcessGroup | None = None, peers: PeerBuffers | None = None
) -> None:
    """Set this process's rank and group size (before any model is built)."""
    global _STATE
    _STATE = TensorParallel(rank, size, group, peers)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the group (in place); x itself without parallelism."""
    state = _STATE
    if state.size > 1:
        dist.all_reduce(x, group=state.group)
    return x


def partial_sums_left_to_norms() -> bool:
    """Whether row-parallel layers (o_proj, down_proj, the embedding) return this rank's partial sum and leave
    the sum over the ranks to the next RMSNorm (`reduce_add_rms_norm`): under tensor parallelism, always."""
    return _STATE.size > 1


def rank_share(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A row-parallel layer's partial output as this rank's share of the sum: the bias is added on rank 0 only."""
    return out if bias is None or _STATE.rank != 0 else out + bias


NormFn = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, norm: NormFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm(sum over the ranks of x, residual)`: one fused kernel through the peer buffers where x fits them
    (decode sizes), else an NCCL all-reduce of x in place, then `norm` (the RMSNorm's own add + norm)."""
    peers = _STATE.peers
    fits = peers is not None and peers.covers(x) and weight.dtype == x.dtype
    if fits and (residual is None or residual.dtype == x.dtype):
        from kiln.kernels.triton_peer_reduce import peer_reduce_add_rms_norm

        return peer_reduce_add_rms_norm(x, residual, weight, eps, peers)
    return norm(all_reduce(x), residual)


def broadcast_from_first_rank(x: torch.Tensor) -> torch.Tensor:
    """x of the group's first rank, on every rank (in place); x itself without parallelism."""
    state = _STATE
    if state.size > 1:
        source = dist.get_global_rank(state.group, 0) if state.group is not None else 0
        dist.broadcast(x, src=source, group=state.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' x concatenated along the last dimension, in rank order."""
    state = _STATE
    if state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.size)]
    dist.all_gather(parts, x.contiguous(), group=state.group)
    return torch.cat(parts, dim=-1)


def tensor_parallel_problems(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> list[str]:
    """What of a model does not split over tp_size ranks (empty when it does)."""
    problems = []
    if num_heads % tp_size:
        problems.append(f"{num_heads} attention heads")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:  # KV heads split evenly, or each replicated evenly
        problems.append(f"{num_kv_heads} KV heads")
    if intermediate_size % tp_size:
        problems.append(f"intermediate size {intermediate_size}")
    return problems


def check_tensor_parallel_size(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> None:
    """A UserInputError naming what does not split and the sizes that would, before any process starts."""
    problems = tensor_parallel_problems(num_heads, num_kv_heads, intermediate_size, tp_size)
    if problems:
        sizes = [n for n in range(1, 17) if not tensor_parallel_problems(num_heads, num_kv_heads, intermediate_size, n)]
        raise UserInputError(
            f"--tp-size {tp_size} does not split the model's {' and '.join(problems)}; "
            f"sizes that do: {', '.join(map(str, sizes))}"
        )
