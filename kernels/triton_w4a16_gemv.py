"""W4A16 products of a few activation rows (decode) on CUDA cores, split-K reduced in the same launch.

Same layout and reference as `triton_w4a16_gemm` (packed uint8 [N / 2, K], rows 2r and 2r + 1 in the low
and high nibbles; fp32 group scales [N, K / group]; optional AWQ pre-quant scale [K]). At one to
MAX_ROWS_GEMV rows tensor-core tiles would be mostly padding: a program instead multiplies its
[BLOCK_N / 2, BLOCK_K] tile of packed bytes (both nibbles: even and odd output rows; read as int32 words
where they align, see `triton_w4_dequantize.word_nibbles`) with each row and reduces along K in
registers; split-K keeps enough weight bytes in flight, and `triton_split_k` adds the splits up in the
same launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel
from kiln.kernels.triton_split_k import reduce_split_k, split_k_launch, tile_counters
from kiln.kernels.triton_w4_dequantize import (
    NIBBLE_XOR_BITS,
    signed_nibbles,
    signed_nibbles_fp32,
    word_activations,
    word_nibbles,
)
from kiln.kernels.triton_w4a16_half2_rows import half2_rows_sums, put_row

MAX_ROWS_GEMV = 4  # up to this many rows, the CUDA-core kernel (no tensor-core tile padding to 16 rows)
# Tile and launch settings of the CUDA-core kernel, module level so a tuning sweep can change them. unpack:
# how packed weights become floats. "words" reads int32 words (triton_w4_dequantize.word_nibbles: the SASS
# of the byte loop showed ~14 instructions a weight byte, so that kernel was bound by instruction issue,
# not memory; words take ~9); "floats" reads bytes with the bit trick of signed_nibbles_fp32; "ints"
# converts bytes with int-to-float instructions (the slowest, kept for checks).
# One row, swept on an H200 (bf16, group 128, Llama-3-8B's four layer shapes, docs/benchmarks.md rounds 7, 13
# and 14), each unpack with its own best settings: "half2" (the default) reads words, multiplies on fp16x2
# instructions (triton_w4_dequantize.half2_rows_parts) and sums across threads once after its loop
# (triton_w4a16_half2_rows): 46.4 us for the four layers (55.1 us with the sums taken every loop step); "words":
# 61.9 us; the floats path's best: 86 us. KILN_INT4_GEMV_UNPACK=words or =floats picks another path for an A/B
# run (docs/bench.md), with the words settings.
_ONE_ROW_SETTINGS = {
    "half2": {"block_n": 128, "num_warps": 2, "num_stages": 2, "programs_per_sm": 8},
    "words": {"block_n": 128, "num_warps": 4, "num_stages": 2, "programs_per_sm": 16},
}
# The Triton interpreter cannot run half2's inline PTX: there words are the default.
_UNPACK = os.environ.get("KILN_INT4_GEMV_UNPACK", "words" if os.environ.get("TRITON_INTERPRET") == "1" else "half2")
GEMV_CONFIG = {**_ONE_ROW_SETTINGS.get(_UNPACK, _ONE_ROW_SETTINGS["words"]), "unpack": _UNPACK}
# Two to MAX_ROWS_GEMV rows: words keep every unpacked weight of the tile live for the next row (too many
# registers) and were 3-17% slower than floats at 2 and 4 rows in the same run, so floats keep the previous
# settings (round 5's sweep). KILN_INT4_GEMV_FEW_ROWS=half2 takes the half2 loop (triton_w4a16_half2_rows:
# each word unpacked once for all rows; in its SASS for sm_90 a loop step of 2 and 4 rows has 1.4x and 2.3x
# the instructions of one row). Not yet run on a GPU, so not the default; its settings are a first guess.
_FEW_ROWS_SETTINGS = {
    "floats": {"block_n": 256, "num_warps": 4, "num_stages": 1, "programs_per_sm": 16},
    "half2": {"block_n": 128, "num_warps": 4, "num_stages": 2, "programs_per_sm": 8},
}
_FEW_ROWS_UNPACK = os.environ.get("KILN_INT4_GEMV_FEW_ROWS", "floats")
FEW_ROWS_GEMV_CONFIG = {
    **_FEW_ROWS_SETTINGS.get(_FEW_ROWS_UNPACK, _FEW_ROWS_SETTINGS["floats"]),
    "unpack": _FEW_ROWS_UNPACK,
}


def gemv_config(num_rows: int) -> dict:
    """The launch settings for `num_rows` activation rows."""
    return GEMV_CONFIG if num_rows == 1 else FEW_ROWS_GEMV_CONFIG


@triton.jit
def _word_tile_sums(
    x_ptr, w_ptr, pre_quant_scale_ptr, pairs, pair_mask, k0, K, stride_xm, stride_wn, xor_bits,
    NUM_ROWS: tl.constexpr, ROWS: tl.constexpr, HAS_PRE_QUANT_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Row sums [ROWS, HALF_N] (even, odd outputs) of one K tile read as int32 words (w_ptr: words [N / 2, K / 4]),
    multiplied in fp32 (word_nibbles)."""
    HALF_N: tl.constexpr = pairs.shape[0]
    cols = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # word columns: K positions 4c .. 4c + 3
    col_mask = cols < K // 4
    words = tl.load(
        w_ptr + pairs[:, None].to(tl.int64) * stride_wn + cols[None, :],
        mask=pair_mask[:, None] & col_mask[None, :],
        other=0,
    )
    # s * 2**p (p: see triton_w4_dequantize.word_nibbles); the activations below take the 2**-p (exact)
    low0, low1, low2, low3, high0, high1, high2, high3 = word_nibbles(words, xor_bits)
    rows = tl.arange(0, ROWS)
    sums_even = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    sums_odd = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    for m in tl.static_range(NUM_ROWS):
        x_row = x_ptr + m * stride_xm
        x0, x1, x2, x3 = word_activations(x_row, pre_quant_scale_ptr, cols, col_mask, HAS_PRE_QUANT_SCALE)
        even = low0 * x0[None, :] + low1 * (x1 * 0.00390625)[None, :] + low2 * (x2 * 1.52587890625e-05)[None, :]
        even += low3 * (x3 * 0.000244140625)[None, :]
        odd = high0 * (x0 * 0.0625)[None, :] + high1 * (x1 * 0.000244140625)[None, :]
        odd += high2 * (x2 * 0.00390625)[None, :] + high3 * (x3 * 1.52587890625e-05)[None, :]
        sums_even = put_row(sums_even, tl.sum(even, axis=1), rows, m)
        sums_odd = put_row(sums_odd, tl.sum(odd, axis=1), rows, m)
    return sums_even, sums_odd


@triton.jit
def _byte_tile_sums(
    x_ptr, w_ptr, scales_ptr, pre_quant_scale_ptr, pairs, pair_mask, even, ks, k_mask, K, stride_xm, stride_wn,
    stride_sn, NUM_ROWS: tl.constexpr, ROWS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_PRE_QUANT_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, FLOAT_NIBBLES: tl.constexpr,
):  # fmt: skip
    """Row sums [ROWS, HALF_N] of one K tile read as bytes (w_ptr: uint8 [N / 2, K]); scaled here if several
    groups share the tile."""
    HALF_N: tl.constexpr = pairs.shape[0]
    w_mask = pair_mask[:, None] & k_mask[None, :]
    packed = tl.load(w_ptr + pairs[:, None].to(tl.int64) * stride_wn + ks[None, :], mask=w_mask, other=0)
    if FLOAT_NIBBLES:  # bit tricks instead of int-to-float conversions (see signed_nibbles_fp32)
        low, high = signed_nibbles_fp32(packed)
    else:
        low_int, high_int = signed_nibbles(packed)
        low, high = low_int.to(tl.float32), high_int.to(tl.float32)
    if GROUP_SIZE % BLOCK_K != 0:  # several groups in the tile: scale every weight
        groups = ks // GROUP_SIZE
        low = low * tl.load(scales_ptr + even[:, None] * stride_sn + groups[None, :], mask=w_mask, other=0.0)
        high = high * tl.load(scales_ptr + (even + 1)[:, None] * stride_sn + groups[None, :], mask=w_mask, other=0.0)
    if HAS_PRE_QUANT_SCALE:
        pre_quant_scale = tl.load(pre_quant_scale_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
    rows = tl.arange(0, ROWS)
    sums_even = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    sums_odd = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    for m in tl.static_range(NUM_ROWS):
        x = tl.load(x_ptr + m * stride_xm + ks, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_PRE_QUANT_SCALE:
            x = x * pre_quant_scale
        sums_even = put_row(sums_even, tl.sum(low * x[None, :], axis=1), rows, m)
        sums_odd = put_row(sums_odd, tl.sum(high * x[None, :], axis=1), rows, m)
    return sums_even, sums_odd


@triton.jit
def _tile_by_tile_sums(
    x_ptr, w_ptr, scales_ptr, pre_quant_scale_ptr, pairs, pair_mask, even, k_begin, k_end, K, stride_xm, stride_wn,
    stride_sn, xor_bits, NUM_ROWS: tl.constexpr, ROWS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_PRE_QUANT_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, UNPACK: tl.constexpr,
):  # fmt: skip
    """Row sums (even, odd) [ROWS, HALF_N] over K range [k_begin, k_end), each K tile's sums taken across threads
    before the next tile: the words, floats and ints paths (half2 has its own loop, triton_w4a16_half2_rows)."""
    HALF_N: tl.constexpr = pairs.shape[0]
    acc_even = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    acc_odd = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        if GROUP_SIZE % BLOCK_K == 0:  # one scale per output row in this tile: applied to the row sums
            group = k0 // GROUP_SIZE
            s_even = tl.load(scales_ptr + even * stride_sn + group, mask=pair_mask, other=0.0)
            s_odd = tl.load(scales_ptr + (even + 1) * stride_sn + group, mask=pair_mask, other=0.0)
        if UNPACK == "words":
            sums_even, sums_odd = _word_tile_sums(
                x_ptr, w_ptr, pre_quant_scale_ptr, pairs, pair_mask, k0, K, stride_xm, stride_wn, xor_bits,
                NUM_ROWS, ROWS, HAS_PRE_QUANT_SCALE, BLOCK_K,
            )  # fmt: skip
        else:
            sums_even, sums_odd = _byte_tile_sums(
                x_ptr, w_ptr, scales_ptr, pre_quant_scale_ptr, pairs, pair_mask, even, ks, k_mask, K, stride_xm,
                stride_wn, stride_sn, NUM_ROWS, ROWS, GROUP_SIZE, HAS_PRE_QUANT_SCALE, BLOCK_K, UNPACK == "floats",
            )  # fmt: skip
        if GROUP_SIZE % BLOCK_K == 0:
            sums_even = sums_even * s_even[None, :]
            sums_odd = sums_odd * s_odd[None, :]
        acc_even += sums_even
        acc_odd += sums_odd
    return acc_even, acc_odd


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    w_ptr,
    scales_ptr,
    pre_quant_scale_ptr,
    bias_ptr,
    part_ptr,
    counter_ptr,
    out_ptr,
    N,
    K,
    k_per_split,
    num_splits,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_pm,
    stride_ps,
    stride_om,
    xor_bits,
    NUM_ROWS: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_PRE_QUANT_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UNPACK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    # A few activation rows (decode): multiply-and-reduce on CUDA cores, with the weight tile kept in
    # the layout it was loaded in (K fastest), so no shared-memory transpose sits between load and use.
    # Each weight tile is loaded and unpacked once and used for every row (rows of the [ROWS, HALF_N]
    # accumulators are updated one at a time: a tensor has no per-row assignment).
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    HALF_N: tl.constexpr = BLOCK_N // 2
    pairs = pid_n * HALF_N + tl.arange(0, HALF_N)
    pair_mask = pairs < N // 2
    even = 2 * pairs.to(tl.int64)
    rows = tl.arange(0, ROWS)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if UNPACK == "half2":  # cross-thread sums once, after the loop
        acc_even, acc_odd = half2_rows_sums(
            x_ptr, w_ptr, scales_ptr, pre_quant_scale_ptr, pairs, pair_mask, even, k_begin, k_end, K, stride_xm,
            stride_wn, stride_sn, NUM_ROWS, ROWS, GROUP_SIZE, HAS_PRE_QUANT_SCALE, BLOCK_K,
        )  # fmt: skip
    else:
        acc_even, acc_odd = _tile_by_tile_sums(
            x_ptr, w_ptr, scales_ptr, pre_quant_scale_ptr, pairs, pair_mask, even, k_begin, k_end, K, stride_xm,
            stride_wn, stride_sn, xor_bits, NUM_ROWS, ROWS, GROUP_SIZE, HAS_PRE_QUANT_SCALE, BLOCK_K, UNPACK,
        )  # fmt: skip
    part_rows = part_ptr + split * stride_ps + rows[:, None] * stride_pm
    part_mask = (rows < NUM_ROWS)[:, None] & pair_mask[None, :]
    tl.store(part_rows + even[None, :], acc_even, mask=part_mask)
    tl.store(part_rows + (even + 1)[None, :], acc_odd, mask=part_mask)
    # The program's BLOCK_N output columns (pairs of even and odd rows) are tile pid_n of the output.
    reduce_split_k(
        part_ptr, counter_ptr, out_ptr, bias_ptr, bias_ptr, bias_ptr, pid_n, N, num_splits,
        stride_ps, stride_pm, stride_om, NUM_ROWS=NUM_ROWS, BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S,
        HAS_BIAS=HAS_BIAS, HAS_INPUT_SCALE=False, HAS_COL_SCALE=False,
    )  # fmt: skip


def w4a16_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    block_k: int,
) -> torch.Tensor:
    """x [1..MAX_ROWS_GEMV, K] @ dequant(packed, scales)^T + bias; K tiles of `block_k` (a power of two <= group)."""
    num_rows, k = x.shape
    n = packed.shape[0] * 2
    config = gemv_config(num_rows)
    block_n = config["block_n"]
    launch = split_k_launch(x, n, k, block_n, block_k, config["programs_per_sm"])
    partial, out = launch.partial, launch.out
    pdl = use_pdl(x.device)
    unpack = config["unpack"]
    reads_words = unpack in ("words", "half2")
    words = _as_words(packed) if reads_words and group_size % block_k == 0 else None
    if words is None and reads_words:
        unpack = "floats"  # tiles spanning several scale groups, or bytes that do not form aligned words
    weights = words if words is not None else packed
    _w4a16_gemv_kernel[launch.grid](
        x, weights, scales, pre_quant_scale if pre_quant_scale is not None else scales,
        bias if bias is not None else scales, partial, tile_counters(x.device), out,
        n, k, launch.k_per_split, launch.num_splits, x.stride(0), weights.stride(0), scales.stride(0),
        partial.stride(1), partial.stride(0), out.stride(0), NIBBLE_XOR_BITS,
        NUM_ROWS=num_rows, ROWS=triton.next_power_of_2(num_rows), GROUP_SIZE=group_size,
        HAS_PRE_QUANT_SCALE=pre_quant_scale is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_S=triton.next_power_of_2(launch.num_splits), HAS_BIAS=bias is not None,
        UNPACK=unpack, USE_PDL=pdl,
        num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )  # fmt: skip
    return out


def _as_words(packed: torch.Tensor) -> torch.Tensor | None:
    """packed uint8 [N / 2, K] viewed as int32 [N / 2, K / 4] (no copy), or None where its bytes do not
    form whole, 4-byte aligned words (a K shard starting mid-word)."""
    aligned = packed.stride(0) % 4 == 0 and packed.storage_offset() % 4 == 0
    if packed.shape[1] % 4 != 0 or packed.stride(1) != 1 or not aligned:
        return None
    return packed.view(torch.int32)
