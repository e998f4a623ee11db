"""Tensor-parallel state of this process and the two collectives the layers need (torch.distributed).

The runtime sets the state once, before building the model (`set_tensor_parallel`); layers read it
when they are built and when they load, so a model built with world size N holds this rank's shard
of every split tensor. With a world size of 1 (the default) nothing is split and no collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def split(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, channels), which must divide evenly."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {self.size}")
        return total // self.size


_STATE = TensorParallel()


def tensor_parallel() -> TensorParallel:
    """The state layers read."""
    return _STATE


def set_tensor_parallel(rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
    """Set this process's rank and group size (before any model is built)."""
    global _STATE
    _STATE = TensorParallel(rank, size, group)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the group (in place); x itself without parallelism."""
    state = _STATE
    if state.size > 1:
        dist.all_reduce(x, group=state.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' x concatenated along the last dimension, in rank order."""
    state = _STATE
    if state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.size)]
    dist.all_gather(parts, x.contiguous(), group=state.group)
    return torch.cat(parts, dim=-1)
