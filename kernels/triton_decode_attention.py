"""Split-KV (flash-decoding) paged attention for steps where every sequence has exactly one new token.

Grid (num_kv_heads, num_seqs, num_splits) (see `_heads_fastest`): a program loads the query rows of one
KV head's whole GQA group at once, so each key/value is read once per group, and runs an online softmax
over its share of the sequence's keys, read through the block table. With several splits, the partial
results are merged by their log-sum-exp (`triton_decode_merge`). Reference: `attention.reference_attention`.

CUDA graphs: the kernels read lengths and block ids from device tensors only and the partial buffers
are sized from host ints (num_seqs, num_heads, num_splits), so a graph captured with a fixed
`num_splits` stays correct for any context lengths on replay (splits past the end come out empty).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel
from kiln.kernels.triton_decode_merge import decode_merge_kernel, merge_if_last, split_keys
from kiln.kernels.triton_split_k import MAX_TILES, num_sms, tile_counters


def _merge_in_kernel() -> bool:
    """KILN_DECODE_MERGE_IN_KERNEL=1: the split kernel's last program merges the splits (no merge launch).

    Off: tested on an H200, it made the fp8 batch-1 TPOT slower (3.37 against 3.13 ms)."""
    return os.environ.get("KILN_DECODE_MERGE_IN_KERNEL") == "1"


def _fp8_cache_as_fp16() -> bool:
    """An FP8 cache's keys and values become fp16 for the products, not bf16 (KILN_DECODE_FP8_AS_FP16=0: bf16).

    E4M3 to fp16 is one hardware conversion per pair of values. On an H200 (256 sequences x 1,024 keys,
    docs/benchmarks.md round 7) the decode kernel read the FP8 cache at 1.80 TB/s against 1.71 with bf16
    products: a gain, but far from a bf16 cache's 4.1 TB/s; the GPU attention tests pass both ways."""
    return os.environ.get("KILN_DECODE_FP8_AS_FP16", "1") != "0"


def _heads_fastest() -> bool:
    """The KV heads of one sequence are neighbouring programs (launched together); KILN_DECODE_GRID=seqs: the
    sequences are.

    The cache holds a block's keys token by token, every KV head's row side by side ([block, token, head,
    dim]), so one head's program reads 128-byte (FP8) or 256-byte rows a token's width apart; with a
    sequence's heads side by side, their reads of a block arrive together. On an H200 (docs/benchmarks.md
    round 12) that made the bf16-cache kernel 1-3% faster at four of five shapes and left the FP8 one as it was."""
    return os.environ.get("KILN_DECODE_GRID", "heads") != "seqs"


@dataclass(frozen=True)
class DecodeTile:
    """Keys a program reads per loop step, its warps and software-pipeline stages, and the fewest query rows
    of its products (a GQA group padded with zero rows up to this; Triton pads tensor-core tiles to 16 rows
    itself, but a 16-row tile of scores costs every softmax instruction for the padding rows too)."""

    block_n: int
    num_warps: int
    num_stages: int
    min_rows: int = 16


# Per cache element size, from `perf_triton_attention.py --sweep` on an H200 (docs/benchmarks.md, rounds 8-9, 12).
# bf16: 64 keys, 4 warps (256 sequences x 1,024 keys: 263.7 us, 4.1 TB/s; 32 keys and 2 warps: 282.3).
# FP8: 32 keys, 2 warps, and 4-row products (round 12): 263.5 us at 256 x 1,536 against 300.3 with 16 rows (the
# loop is bound by its instructions, not by memory: a read-only probe of the same blocks reaches ~4 TB/s, and
# a 16-row tile spends every softmax instruction on 12 padding rows too); 127.7 against 144.1 us at 1,024 x 160
# (a 128/128 step). With 16 rows, the column-wise denominators below cost 34 registers a thread more (7
# programs an SM instead of 9) and the kernel was 16% slower: keep the rows at 4 for FP8.
DECODE_TILES = {2: DecodeTile(64, 4, 2), 1: DecodeTile(32, 2, 2, min_rows=4)}

MIN_KEYS_PER_SPLIT = 256  # fewer keys per program than this and the merge costs more than it gains
MAX_SPLITS = 64
NO_WINDOW = 1 << 30  # stands for sliding_window=None: a window longer than any context


# Eager decode steps (past the largest CUDA graph) bring any split count and block-table width: no new
# compilation per class of those integers (see _prefill_kernel).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    counter_ptr,
    scale_log2,
    v_scale,
    sliding_window,
    group_size,
    head_dim,
    num_splits,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_v_b,
    stride_v_s,
    stride_v_h,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    MERGE_IN_KERNEL: tl.constexpr,
    FP8_AS_FP16: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    if HEADS_FASTEST:  # grid (num_kv_heads, num_seqs, num_splits): see _heads_fastest
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        num_kv_heads = tl.num_programs(0)
    else:  # grid (num_seqs, num_kv_heads, num_splits)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    split = tl.program_id(2)
    num_heads = num_kv_heads * group_size
    context_len = tl.load(seq_lens_ptr + seq)
    # The query is at position context_len - 1 and sees keys [lo, context_len); splits share that
    # range in BLOCK_N-aligned pieces, and those past the range have nothing to do (see split_keys).
    lo, keys_per_split, in_use = split_keys(context_len, sliding_window, num_splits, BLOCK_N)
    if split >= in_use:
        return
    start = lo + split * keys_per_split
    end = tl.minimum(start + keys_per_split, context_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group_size + g  # query heads of this group; rows >= group_size are padding
    q_mask = (g[:, None] < group_size) & (d[None, :] < head_dim)
    # [BLOCK_G, BLOCK_D]; in a decode step token i belongs to sequence i.
    q = tl.load(q_ptr + seq * stride_q_t + heads[:, None] * stride_q_h + d[None, :], mask=q_mask, other=0.0)
    if FP8_AS_FP16:  # products in fp16 (see _fp8_cache_as_fp16); the query clamped into fp16's range
        dot_dtype: tl.constexpr = tl.float16
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)
    else:
        dot_dtype: tl.constexpr = q_ptr.dtype.element_ty
    q = q.to(dot_dtype)

    # A finite start for the running max keeps exp2(m_old - m_new) free of inf - inf.
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    # Softmax denominators kept per key column and summed once after the loop: a row sum in the loop is a
    # cross-thread (and, with several warps, cross-warp) reduction every step.
    l_cols = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n in range(start, end, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        valid = pos < end
        # int64: block * stride can exceed 2**31 elements in a large cache.
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & (d[None, :] < head_dim)
        k_off = block[:, None] * stride_k_b + row[:, None] * stride_k_s + kv_head * stride_k_h + d[None, :]
        k = tl.load(k_cache_ptr + k_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k.to(dot_dtype))) * scale_log2  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_cols = l_cols * alpha[:, None] + p
        v_off = block[:, None] * stride_v_b + row[:, None] * stride_v_s + kv_head * stride_v_h + d[None, :]
        v = tl.load(v_cache_ptr + v_off, mask=kv_mask, other=0.0)
        if FP8_AS_FP16:
            # v_scale here, in fp16, not on the output: without an operation between the conversion and the
            # product, Triton converts on the dot operand, after the transposing load from shared memory,
            # which is one byte a load for 8-bit values (2x the loop's instructions and registers).
            v = v.to(dot_dtype) * v_scale.to(dot_dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype))
        m_i = m_new
    l_i = tl.sum(l_cols, 1)

    if not FP8_AS_FP16:
        acc = acc * v_scale  # the cache holds v / v_scale (1 unless FP8); the merge below is linear in it
    if WRITE_OUT:  # a single split is the whole answer
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + seq * stride_o_t + heads[:, None] * stride_o_h + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partial result, normalised, with its base-2 log-sum-exp; an empty split gets lse ~ -1e30.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        part = (seq * num_heads + heads) * num_splits + split  # [BLOCK_G] rows of part_lse
        g_mask = g < group_size
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=g_mask)
        tl.store(part_out_ptr + part[:, None] * head_dim + d[None, :], acc / l_safe[:, None], mask=q_mask)
        if MERGE_IN_KERNEL:
            merge_if_last(
                part_out_ptr, part_lse_ptr, counter_ptr, out_ptr, seq * num_kv_heads + kv_head,
                (seq * num_heads + heads) * num_splits, in_use, head_dim, seq * stride_o_t + heads * stride_o_h,
                g_mask, q_mask, d,
            )  # fmt: skip


def decode_num_splits(max_keys: int, num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per (sequence, KV head) so the grid covers the GPU about twice, each with enough keys."""
    wanted = math.ceil(2 * num_sms(device) / max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, math.ceil(max_keys / MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    tile: DecodeTile | None = None,
    heads_fastest: bool | None = None,
) -> None:
    """One query token per sequence: q, out [num_seqs, num_heads, head_dim]; writes `out`.

    The caches hold k / k_scale and v / v_scale: k_scale folds into the softmax scale, v_scale into the output.
    `tile` overrides DECODE_TILES (for sweeps); head dims over 128 halve its keys per step. `heads_fastest`
    overrides the grid order of _heads_fastest (for sweeps).
    """
    # caches: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks] int32
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    tile = tile or DECODE_TILES[k_cache.element_size()]
    # Partial buffers depend only on host ints, so they are safe to allocate under graph capture.
    part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_n = tile.block_n if block_d <= 128 else tile.block_n // 2  # keys a loop step
    merge_in_kernel = num_splits > 1 and _merge_in_kernel() and num_seqs * num_kv_heads <= MAX_TILES
    pdl = use_pdl(q.device)
    heads_fastest = _heads_fastest() if heads_fastest is None else heads_fastest
    grid = (num_kv_heads, num_seqs, num_splits) if heads_fastest else (num_seqs, num_kv_heads, num_splits)
    _decode_split_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        tile_counters(q.device),
        scale * k_scale * math.log2(math.e),
        v_scale,
        NO_WINDOW if sliding_window is None else sliding_window,
        group_size,
        head_dim,
        num_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_G=max(tile.min_rows, triton.next_power_of_2(group_size)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        WRITE_OUT=num_splits == 1,
        MERGE_IN_KERNEL=merge_in_kernel,
        FP8_AS_FP16=k_cache.dtype == torch.float8_e4m3fn and _fp8_cache_as_fp16(),
        HEADS_FASTEST=heads_fastest,
        USE_PDL=pdl,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        launch_pdl=pdl,
    )
    if num_splits > 1 and not merge_in_kernel:
        decode_merge_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            seq_lens,
            out,
            NO_WINDOW if sliding_window is None else sliding_window,
            head_dim,
            num_splits,
            out.stride(0),
            out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            USE_PDL=pdl,
            launch_pdl=pdl,
        )
