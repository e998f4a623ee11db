"""Split-K for the small-batch GEMV kernels, reduced inside the same launch.

A decode GEMV needs several programs per output tile (split-K) to keep enough weight bytes in flight.
Adding the partial sums up in a second kernel (plus the cast and bias) costs two or three extra launches
per linear layer, which at batch 1 is a large share of a layer's few tens of microseconds. Instead every
program stores its fp32 partial, then counts itself in on its tile's counter; the last one to arrive sums
all partials in split order (so the result does not depend on which program came last: deterministic),
applies the scales and the bias, writes the output and resets the counter to zero for the next call.

The counters live in one zeroed buffer per device, allocated once: its address stays fixed, so the
kernels replay correctly from CUDA graphs, and each call leaves it zeroed again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_TILES = 1 << 14  # output tiles a single call may have (N / BLOCK_N); enough for any N <= 1M at 64 columns


@functools.cache
def tile_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed int32 arrival counters, one per output tile."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_tiles(num_tiles: int) -> None:
    if num_tiles > MAX_TILES:
        raise ValueError(f"{num_tiles} output tiles exceed the split-K counters ({MAX_TILES})")


@triton.jit
def reduce_split_k(
    part_ptr,
    counter_ptr,
    out_ptr,
    bias_ptr,
    input_scale_ptr,
    col_scale_ptr,
    tile,
    N,
    num_splits,
    stride_ps,
    stride_pm,
    stride_om,
    NUM_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INPUT_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
):
    """Called by every program of `tile` after storing its partial [NUM_ROWS, BLOCK_N] at part[split]."""
    tl.debug_barrier()  # every thread's partial is written before the arrival is counted (release below)
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    if arrived == num_splits - 1:
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        splits = tl.arange(0, BLOCK_S)
        mask = (splits < num_splits)[:, None] & col_mask[None, :]
        scale = tl.full([BLOCK_N], 1.0, tl.float32)
        if HAS_INPUT_SCALE:
            scale = scale * tl.load(input_scale_ptr)
        if HAS_COL_SCALE:
            scale = scale * tl.load(col_scale_ptr + cols, mask=col_mask, other=0.0)
        for m in tl.static_range(NUM_ROWS):
            # .cg: read the other programs' partials from L2, never from a stale line of this SM's L1.
            parts = tl.load(
                part_ptr + splits[:, None] * stride_ps + m * stride_pm + cols[None, :],
                mask=mask,
                other=0.0,
                cache_modifier=".cg",
            )
            total = tl.sum(parts, axis=0) * scale
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            tl.store(
                out_ptr + m * stride_om + cols,
                total.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                mask=col_mask,
            )
        tl.atomic_xchg(counter_ptr + tile, 0)


def split_k_plan(n: int, k: int, block_n: int, block_k: int, programs: int) -> tuple[int, int]:
    """(k_per_split, num_splits): about `programs` programs over the N tiles, no empty split."""
    k_steps = triton.cdiv(k, block_k)
    split_k = max(1, min(programs // triton.cdiv(n, block_n), k_steps))
    k_per_split = triton.cdiv(k_steps, split_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


@dataclass(frozen=True)
class SplitKLaunch:
    """What a split-K GEMV launch needs besides its operands: the plan, the grid and its two buffers."""

    k_per_split: int
    num_splits: int
    num_tiles: int
    partial: torch.Tensor  # [num_splits, rows, N] fp32, summed in split order by each tile's last program
    out: torch.Tensor  # [rows, N] in the activation's dtype

    @property
    def grid(self) -> tuple[int, int]:
        """(output tiles, splits)."""
        return self.num_tiles, self.num_splits


def split_k_launch(x: torch.Tensor, n: int, k: int, block_n: int, block_k: int, programs_per_sm: int) -> SplitKLaunch:
    """The plan and buffers of x [rows, K] times an [N, K] weight, about `programs_per_sm` programs an SM."""
    num_rows = x.shape[0]
    k_per_split, num_splits = split_k_plan(n, k, block_n, block_k, programs_per_sm * num_sms(x.device))
    num_tiles = triton.cdiv(n, block_n)
    check_tiles(num_tiles)
    partial = torch.empty(num_splits, num_rows, n, dtype=torch.float32, device=x.device)
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    return SplitKLaunch(k_per_split, num_splits, num_tiles, partial, out)
