"""W4A16 products of a few activation rows (decode) on CUDA cores, split-K reduced in the same launch.

Same layout and reference as `triton_w4a16_gemm` (packed uint8 [N / 2, K], rows 2r and 2r + 1 in the low
and high nibbles; fp32 group scales [N, K / group]; optional AWQ pre-quant scale [K]). At one to
MAX_ROWS_GEMV rows tensor-core tiles would be mostly padding: a program instead multiplies its
[BLOCK_N / 2, BLOCK_K] tile of packed bytes (both nibbles: even and odd output rows) with each row and
reduces along K in registers; split-K keeps enough weight bytes in flight, and `triton_split_k` adds the
splits up in the same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel
from kiln.kernels.triton_split_k import reduce_split_k, split_k_launch, tile_counters
from kiln.kernels.triton_w4_dequantize import signed_nibbles, signed_nibbles_fp32

MAX_ROWS_GEMV = 4  # up to this many rows, the CUDA-core kernel (no tensor-core tile padding to 16 rows)
# Tile and launch settings of the CUDA-core kernel, module level so a tuning sweep can change them.
# Swept on an H200 (bf16, group 128, Llama-3-8B's four layer shapes at batch 1, 2026-11-28): 256 outputs
# and 16 programs per SM through split-K, 86 us for the four layers (the first sweep's 128 / 8 warps /
# 8 programs: ~93 us). float_nibbles: see triton_w4_dequantize.signed_nibbles_fp32 (qkv 11.6 -> 11.2 us).
GEMV_CONFIG = {"block_n": 256, "num_warps": 4, "num_stages": 1, "programs_per_sm": 16, "float_nibbles": True}


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
    NUM_ROWS: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_PRE_QUANT_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FLOAT_NIBBLES: tl.constexpr,
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
    acc_even = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    acc_odd = tl.zeros([ROWS, HALF_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        w_mask = pair_mask[:, None] & k_mask[None, :]
        packed = tl.load(w_ptr + pairs[:, None].to(tl.int64) * stride_wn + ks[None, :], mask=w_mask, other=0)
        if FLOAT_NIBBLES:  # bit tricks instead of int-to-float conversions (see signed_nibbles_fp32)
            low, high = signed_nibbles_fp32(packed)
        else:
            low_int, high_int = signed_nibbles(packed)
            low, high = low_int.to(tl.float32), high_int.to(tl.float32)
        if GROUP_SIZE % BLOCK_K == 0:  # one scale per output row in this tile: applied to the row sums
            group = k0 // GROUP_SIZE
            s_even = tl.load(scales_ptr + even * stride_sn + group, mask=pair_mask, other=0.0)
            s_odd = tl.load(scales_ptr + (even + 1) * stride_sn + group, mask=pair_mask, other=0.0)
        else:  # several groups in the tile: scale every weight
            groups = ks // GROUP_SIZE
            low = low * tl.load(scales_ptr + even[:, None] * stride_sn + groups[None, :], mask=w_mask, other=0.0)
            high = high * tl.load(
                scales_ptr + (even + 1)[:, None] * stride_sn + groups[None, :], mask=w_mask, other=0.0
            )
        if HAS_PRE_QUANT_SCALE:
            pre_quant_scale = tl.load(pre_quant_scale_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        for m in tl.static_range(NUM_ROWS):
            x = tl.load(x_ptr + m * stride_xm + ks, mask=k_mask, other=0.0).to(tl.float32)
            if HAS_PRE_QUANT_SCALE:
                x = x * pre_quant_scale
            sum_even = tl.sum(low * x[None, :], axis=1)
            sum_odd = tl.sum(high * x[None, :], axis=1)
            if GROUP_SIZE % BLOCK_K == 0:
                sum_even = sum_even * s_even
                sum_odd = sum_odd * s_odd
            is_row = (rows == m)[:, None]
            acc_even = tl.where(is_row, acc_even + sum_even[None, :], acc_even)
            acc_odd = tl.where(is_row, acc_odd + sum_odd[None, :], acc_odd)
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
    block_n = GEMV_CONFIG["block_n"]
    launch = split_k_launch(x, n, k, block_n, block_k, GEMV_CONFIG["programs_per_sm"])
    partial, out = launch.partial, launch.out
    pdl = use_pdl(x.device)
    _w4a16_gemv_kernel[launch.grid](
        x, packed, scales, pre_quant_scale if pre_quant_scale is not None else scales,
        bias if bias is not None else scales, partial, tile_counters(x.device), out,
        n, k, launch.k_per_split, launch.num_splits, x.stride(0), packed.stride(0), scales.stride(0),
        partial.stride(1), partial.stride(0), out.stride(0),
        NUM_ROWS=num_rows, ROWS=triton.next_power_of_2(num_rows), GROUP_SIZE=group_size,
        HAS_PRE_QUANT_SCALE=pre_quant_scale is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_S=triton.next_power_of_2(launch.num_splits), HAS_BIAS=bias is not None,
        FLOAT_NIBBLES=GEMV_CONFIG["float_nibbles"], USE_PDL=pdl,
        num_warps=GEMV_CONFIG["num_warps"], num_stages=GEMV_CONFIG["num_stages"], launch_pdl=pdl,
    )  # fmt: skip
    return out
