"""Merging split-KV decode attention's partial results (see `triton_decode_attention`).

Each split of a (sequence, KV head) leaves its normalised partial output and base-2 log-sum-exp per query
head; the merge weights each split by exp2(lse - max lse). Either a kernel of its own after the split kernel
(`decode_merge_kernel`) or, with KILN_DECODE_MERGE_IN_KERNEL=1, the last split program to finish
(`merge_if_last`, one launch fewer).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.pdl import wait_for_previous_kernel


@triton.jit
def split_keys(context_len, sliding_window, num_splits, BLOCK_N: tl.constexpr):
    """(lo, keys_per_split, splits_in_use) of a sequence: the query sees keys [lo, context_len), cut into
    BLOCK_N-aligned pieces of keys_per_split; splits past splits_in_use (at least 1) have no keys. A CUDA graph
    fixes the split count for the longest context, so at short ones most splits are empty: their programs stop
    at once and the merge reads only the splits in use (at batch 1, context 256, 32 splits took 7.1 us and 4
    splits 4.8 us, docs/benchmarks.md round 14)."""
    lo = tl.maximum(context_len - sliding_window, 0)
    keys_per_split = tl.maximum(tl.cdiv(tl.cdiv(context_len - lo, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    return lo, keys_per_split, tl.maximum(tl.cdiv(context_len - lo, keys_per_split), 1)


@triton.jit
def merge_if_last(
    part_out_ptr, part_lse_ptr, counter_ptr, out_ptr, tile, first_part, num_splits, head_dim, out_offsets,
    g_mask, q_mask, d,
):  # fmt: skip
    """The last split program of a (sequence, KV head) to arrive merges the group's splits (as
    `decode_merge_kernel`, one launch fewer) and resets its counter (see `triton_split_k`). num_splits: the
    splits in use (split_keys), the programs that count in."""
    tl.debug_barrier()  # every thread's partial is written before the arrival is counted
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    if arrived == num_splits - 1:
        lse_max = tl.full(first_part.shape, -float("inf"), tl.float32)
        for split in range(num_splits):
            lse = tl.load(part_lse_ptr + first_part + split, mask=g_mask, other=-float("inf"), cache_modifier=".cg")
            lse_max = tl.maximum(lse_max, lse)
        lse_max = tl.where(g_mask, lse_max, 0.0)  # padding query rows: no inf - inf
        acc = tl.zeros(q_mask.shape, tl.float32)
        weights = tl.zeros(first_part.shape, tl.float32)
        for split in range(num_splits):
            lse = tl.load(part_lse_ptr + first_part + split, mask=g_mask, other=-float("inf"), cache_modifier=".cg")
            weight = tl.exp2(lse - lse_max)
            part = tl.load(
                part_out_ptr + (first_part + split)[:, None] * head_dim + d[None, :],
                mask=q_mask,
                other=0.0,
                cache_modifier=".cg",
            )
            acc += part * weight[:, None]
            weights += weight
        out = acc / tl.where(g_mask, weights, 1.0)[:, None]
        tl.store(out_ptr + out_offsets[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
        tl.atomic_xchg(counter_ptr + tile, 0)


@triton.jit
def decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    sliding_window,
    head_dim,
    num_splits,
    stride_o_t,
    stride_o_h,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    # One program per (sequence, query head): weight each split in use by exp2(lse - max lse).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    _, _, in_use = split_keys(tl.load(seq_lens_ptr + seq), sliding_window, num_splits, BLOCK_N)
    rows = (seq * tl.num_programs(1) + head) * num_splits + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    s_mask = tl.arange(0, BLOCK_S) < in_use
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + rows, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # [BLOCK_S]
    mask = s_mask[:, None] & (d[None, :] < head_dim)
    parts = tl.load(part_out_ptr + rows[:, None] * head_dim + d[None, :], mask=mask, other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_o_t + head * stride_o_h + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)
