"""Paged attention for prefill, chunked prefill and mixed batches (any number of new tokens per sequence).

Grid (num_heads, num_tiles): a tile is up to BLOCK_M consecutive new tokens of one sequence; the host
builds the tile -> (sequence, first query) map from `cu_seqlens_q_host`. A program loops over the keys
its tile can see (from the sliding-window start of its first query to its last query, causal), read
through the block table, with an online softmax in fp32. Reference: `attention.reference_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kiln.core.host_transfer import to_device
from kiln.kernels.triton_decode_attention import NO_WINDOW


# num_tiles and the block table's width (stride_bt) change with every step's batch: specialised (Triton's
# default for integer arguments: == 1, divisible by 16, other), the kernel would compile again the first
# time a step fell in another class, a stall of ~1 s in the middle of serving (docs/benchmarks.md round 8).
@triton.jit(do_not_specialize=["num_tiles", "stride_bt"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    tiles_ptr,
    num_tiles,
    scale_log2,
    v_scale,
    sliding_window,
    group_size,
    head_dim,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = head // group_size
    seq = tl.load(tiles_ptr + tile)  # tiles: [2, num_tiles] int32 = (sequence, first query in it)
    first_query = tl.load(tiles_ptr + num_tiles + tile)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin
    context_len = tl.load(seq_lens_ptr + seq)
    cached_len = context_len - q_len  # new tokens are the last q_len positions of the context

    m = first_query + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_pos = cached_len + m  # [BLOCK_M] context positions of the tile's queries
    q_mask = (m[:, None] < q_len) & (d[None, :] < head_dim)
    tokens = (q_begin + m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_t + head * stride_q_h + d[None, :], mask=q_mask, other=0.0)

    # Keys seen by any query of the tile: [window start of the first query, last query] inclusive.
    lo = tl.maximum(cached_len + first_query - sliding_window + 1, 0)
    hi = cached_len + tl.minimum(first_query + BLOCK_M, q_len)  # exclusive
    # A finite start for the running max: rows with every key masked in a tile stay NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n in range(lo, hi, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        valid = pos < hi
        # int64: block * stride can exceed 2**31 elements in a large cache.
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & (d[None, :] < head_dim)
        k_off = block[:, None] * stride_k_b + row[:, None] * stride_k_s + kv_head * stride_k_h + d[None, :]
        k = tl.load(k_cache_ptr + k_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
        allowed = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = block[:, None] * stride_v_b + row[:, None] * stride_v_s + kv_head * stride_v_h + d[None, :]
        v = tl.load(v_cache_ptr + v_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    # Every real query sees at least itself, so l_i > 0 on the rows that are stored.
    out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]  # the cache holds v / v_scale
    o_ptrs = out_ptr + tokens[:, None] * stride_o_t + head * stride_o_h + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_block_m(max_query_len: int) -> int:
    """Queries per tile: small tiles when every sequence brings few tokens (decode-heavy mixed batches)."""
    return 16 if max_query_len <= 16 else 64


def build_tiles(cu_seqlens_q: list[int], seq_lens: list[int], block_m: int) -> list[list[int]]:
    """[tile sequences, tile first queries] for the grid, the tiles that read the most keys first."""
    tiles = []
    for seq, (begin, end) in enumerate(zip(cu_seqlens_q[:-1], cu_seqlens_q[1:])):
        q_len = end - begin
        for first in range(0, q_len, block_m):
            keys = seq_lens[seq] - q_len + min(first + block_m, q_len)  # causal reach of the tile
            tiles.append((keys, seq, first))
    # Heaviest first, so the last wave of the grid holds short tiles (sort is stable on ties).
    tiles.sort(key=lambda t: -t[0])
    return [[t[1] for t in tiles], [t[2] for t in tiles]]


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_q_host: list[int],
    seq_lens_host: list[int],
    out: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    derived: dict[str, torch.Tensor] | None = None,
) -> None:
    """Each sequence's new queries over its whole cached context: q, out [num_tokens, num_heads, head_dim].

    The caches hold k / k_scale and v / v_scale (1 unless FP8). `derived` (the step metadata's) keeps the
    tile list on the device for the other layers of the step.
    """
    # caches: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks] int32
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    max_query_len = max(e - b for b, e in zip(cu_seqlens_q_host[:-1], cu_seqlens_q_host[1:]))
    block_m = prefill_block_m(max_query_len)
    key = f"prefill_tiles_{block_m}"
    tiles = None if derived is None else derived.get(key)
    if tiles is None:
        # Packed [2, num_tiles]: the kernel reads a tile's first query at tiles_ptr + num_tiles + tile.
        tiles = to_device(build_tiles(cu_seqlens_q_host, seq_lens_host, block_m), torch.int32, q.device)
        if derived is not None:
            derived[key] = tiles
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    _prefill_kernel[(num_heads, num_tiles)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        tiles,
        num_tiles,
        scale * k_scale * math.log2(math.e),
        v_scale,
        NO_WINDOW if sliding_window is None else sliding_window,
        num_heads // num_kv_heads,
        head_dim,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1],
        # 64x64 tiles, 4 warps, 2 stages: ~235 TFLOP/s on H200 (4 x 2048 tokens, d128, bf16); 128-query
        # tiles, 32/128-key tiles, 8 warps or 3 stages measured no faster.
        BLOCK_M=block_m,
        BLOCK_N=64 if block_d <= 128 else 32,
        BLOCK_D=block_d,
        num_warps=4 if block_d <= 128 else 8,
        num_stages=2,
    )
