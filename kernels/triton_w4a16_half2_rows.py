"""The W4A16 GEMV's loop on the half2 path (KILN_INT4_GEMV_UNPACK=half2) for one to four activation rows.

`triton_w4a16_gemv._w4a16_gemv_kernel` calls it for its program's K range. The general loop there sums each
K tile's products across threads before the next tile: at one row on the half2 path that took 48 shuffles, 4
barriers and shared-memory layout changes a loop step (SASS for sm_90). Here every thread keeps its own partial
sum per output row, scaled by the tile's group scale, and the sums across threads are taken once after the loop.
Several rows share each word's unpacking (`triton_w4_dequantize.half2_rows_parts`); each row's sums run in the
same order as alone, so a row's result does not depend on the rows beside it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_w4_dequantize import half2_pairs, half2_rows_parts, word_activations


@triton.jit
def _load_in_place(pointers):
    """fp32 values at `pointers` (all valid), read in the pointers' own register layout: Triton's tl.load lets its
    coalescing pass pick a layout, and the change back costs shared memory and barriers inside a loop."""
    return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [pointers], tl.float32, True, 1)


@triton.jit
def put_row(sums, row_sums, rows, m: tl.constexpr):
    """sums [ROWS, HALF_N] with row m replaced by row_sums [HALF_N] (a tensor has no per-row assignment)."""
    return tl.where((rows == m)[:, None], row_sums[None, :], sums)


@triton.jit
def _row_pairs(x_ptr, stride_xm, pre_quant_scale_ptr, cols, col_mask, m: tl.constexpr, NUM_ROWS: tl.constexpr,
               HAS_PRE_QUANT_SCALE: tl.constexpr):  # fmt: skip
    """Row m's half2_pairs for word columns `cols` (zeros for a padding row m >= NUM_ROWS)."""
    x0, x1, x2, x3 = word_activations(
        x_ptr + m * stride_xm, pre_quant_scale_ptr, cols, col_mask & (m < NUM_ROWS), HAS_PRE_QUANT_SCALE
    )
    return half2_pairs(x0, x1, x2, x3)


@triton.jit
def half2_rows_sums(
    x_ptr, w_ptr, scales_ptr, pre_quant_scale_ptr, pairs, pair_mask, even, k_begin, k_end, K, stride_xm, stride_wn,
    stride_sn, NUM_ROWS: tl.constexpr, ROWS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_PRE_QUANT_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Sums (even, odd) [ROWS, HALF_N] of NUM_ROWS activation rows (ROWS: 1, 2 or 4, padding rows zero) over K
    range [k_begin, k_end), the sums across threads taken once after the loop."""
    HALF_N: tl.constexpr = pairs.shape[0]
    zeros = tl.zeros([HALF_N, BLOCK_K // 16], dtype=tl.float32)
    even0, odd0, even1, odd1, even2, odd2, even3, odd3 = zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros
    for k0 in range(k_begin, k_end, BLOCK_K):
        # One scale per output row in the tile (GROUP_SIZE % BLOCK_K == 0), loaded straight into the layout of
        # the partials (each thread its own rows' scales): a [HALF_N] load took a shared-memory layout change.
        scale_at = scales_ptr + tl.where(pair_mask, even, 0) * stride_sn + k0 // GROUP_SIZE
        s_even = _load_in_place(scale_at)[:, None]
        s_odd = _load_in_place(scale_at + stride_sn)[:, None]
        cols = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        col_mask = cols < K // 4
        words = tl.load(
            w_ptr + pairs[:, None].to(tl.int64) * stride_wn + cols[None, :],
            mask=pair_mask[:, None] & col_mask[None, :],
            other=0,
        )
        a = _row_pairs(x_ptr, stride_xm, pre_quant_scale_ptr, cols, col_mask, 0, NUM_ROWS, HAS_PRE_QUANT_SCALE)
        if ROWS == 1:
            parts = half2_rows_parts(words, a, None, None, None, 1)
        else:
            b = _row_pairs(x_ptr, stride_xm, pre_quant_scale_ptr, cols, col_mask, 1, NUM_ROWS, HAS_PRE_QUANT_SCALE)
            if ROWS == 2:
                parts = half2_rows_parts(words, a, b, None, None, 2)
            else:
                c = _row_pairs(x_ptr, stride_xm, pre_quant_scale_ptr, cols, col_mask, 2, NUM_ROWS, HAS_PRE_QUANT_SCALE)
                d = _row_pairs(x_ptr, stride_xm, pre_quant_scale_ptr, cols, col_mask, 3, NUM_ROWS, HAS_PRE_QUANT_SCALE)
                parts = half2_rows_parts(words, a, b, c, d, 4)
        even0 += parts[0] * s_even
        odd0 += parts[1] * s_odd
        if ROWS >= 2:
            even1 += parts[2] * s_even
            odd1 += parts[3] * s_odd
        if ROWS == 4:
            even2 += parts[4] * s_even
            odd2 += parts[5] * s_odd
            even3 += parts[6] * s_even
            odd3 += parts[7] * s_odd
    rows = tl.arange(0, ROWS)
    sums_even = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    sums_odd = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    sums_even = put_row(sums_even, tl.sum(even0, axis=1) * 16.0, rows, 0)
    sums_odd = put_row(sums_odd, tl.sum(odd0, axis=1) * 16.0, rows, 0)
    if ROWS >= 2:
        sums_even = put_row(sums_even, tl.sum(even1, axis=1) * 16.0, rows, 1)
        sums_odd = put_row(sums_odd, tl.sum(odd1, axis=1) * 16.0, rows, 1)
    if ROWS == 4:
        sums_even = put_row(sums_even, tl.sum(even2, axis=1) * 16.0, rows, 2)
        sums_odd = put_row(sums_odd, tl.sum(odd2, axis=1) * 16.0, rows, 2)
        sums_even = put_row(sums_even, tl.sum(even3, axis=1) * 16.0, rows, 3)
        sums_odd = put_row(sums_odd, tl.sum(odd3, axis=1) * 16.0, rows, 3)
    return sums_even, sums_odd
