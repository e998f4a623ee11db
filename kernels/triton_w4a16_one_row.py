"""The W4A16 GEMV's loop for one activation row (batch-1 decode) on the half2 path (KILN_INT4_GEMV_UNPACK=half2).

`triton_w4a16_gemv._w4a16_gemv_kernel` calls it for its program's K range. The general loop there sums each
K tile's products across threads before the next tile: at one row on the half2 path that took 48 shuffles, 4
barriers and shared-memory layout changes a loop step (SASS for sm_90). Here every thread keeps its own partial
sum per output row, scaled by the tile's group scale, and the sums across threads are taken once after the loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_w4_dequantize import half2_tile_parts, word_activations


@triton.jit
def _load_in_place(pointers):
    """fp32 values at `pointers` (all valid), read in the pointers' own register layout: Triton's tl.load lets its
    coalescing pass pick a layout, and the change back costs shared memory and barriers inside a loop."""
    return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [pointers], tl.float32, True, 1)


@triton.jit
def half2_one_row_sums(
    x_ptr, w_ptr, scales_ptr, pre_quant_scale_ptr, pairs, pair_mask, even, k_begin, k_end, K, stride_wn, stride_sn,
    GROUP_SIZE: tl.constexpr, HAS_PRE_QUANT_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One activation row's sums (even, odd) [1, HALF_N] over K range [k_begin, k_end) on the half2 path, with
    the sums across threads taken once after the loop: each thread keeps its own partial per output row (the
    group scale applied to it), so the loop has no shuffles, barriers or shared-memory layout changes (the
    SASS of a per-step reduction showed 48 shuffles and 4 barriers a step)."""
    HALF_N: tl.constexpr = pairs.shape[0]
    acc_even = tl.zeros([HALF_N, BLOCK_K // 16], dtype=tl.float32)
    acc_odd = tl.zeros([HALF_N, BLOCK_K // 16], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        # One scale per output row in the tile (GROUP_SIZE % BLOCK_K == 0), loaded straight into the layout of
        # the partials (each thread its own rows' scales): a [HALF_N] load took a shared-memory layout change.
        scale_at = scales_ptr + tl.where(pair_mask, even, 0) * stride_sn + k0 // GROUP_SIZE
        s_even = _load_in_place(scale_at)
        s_odd = _load_in_place(scale_at + stride_sn)
        cols = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        col_mask = cols < K // 4
        words = tl.load(
            w_ptr + pairs[:, None].to(tl.int64) * stride_wn + cols[None, :],
            mask=pair_mask[:, None] & col_mask[None, :],
            other=0,
        )
        x0, x1, x2, x3 = word_activations(x_ptr, pre_quant_scale_ptr, cols, col_mask, HAS_PRE_QUANT_SCALE)
        even_parts, odd_parts = half2_tile_parts(words, x0, x1, x2, x3)
        acc_even += even_parts * s_even[:, None]
        acc_odd += odd_parts * s_odd[:, None]
    return (tl.sum(acc_even, axis=1) * 16.0)[None, :], (tl.sum(acc_odd, axis=1) * 16.0)[None, :]
