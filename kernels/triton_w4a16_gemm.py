"""W4A16 GEMM in Triton: int4 weights dequantized in registers, 16-bit activations, fp32 accumulation.

Works on ModelOpt's export layout directly (reference: `quantized_gemm.int4_linear_reference`):
`packed` uint8 [N / 2, K] holds output rows 2r (low nibble) and 2r + 1 (high nibble) of a signed
int4 weight; `scales` fp32 [N, K / group]; an optional AWQ `pre_quant_scale` [K] multiplies the
activation first. A program computes a [BLOCK_M, BLOCK_N] output tile as two [BLOCK_M, BLOCK_N / 2]
halves, even and odd output rows, so both nibbles of every loaded byte are used without shuffling
registers. When a K tile lies inside one scale group, the group scale multiplies the fp32 partial
product (a [BLOCK_M, BLOCK_N / 2] multiply) instead of every weight.

Up to MAX_ROWS_GEMV rows the CUDA-core GEMV of `triton_w4a16_gemv` runs; up to MAX_ROWS_FUSED rows
(small batches) this module's tensor-core kernel runs with split-K, so that enough weight bytes are in
flight to approach the memory bandwidth. Beyond that (prefill) the product is compute-bound: the weight
is dequantized once into a 16-bit buffer and multiplied by cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_split_k import num_sms
from kiln.kernels.triton_w4_dequantize import dequantize_w4, signed_nibbles
from kiln.kernels.triton_w4a16_gemv import MAX_ROWS_GEMV, w4a16_gemv


@triton.jit(do_not_specialize=["M"])  # the batch's rows: no new compilation per class of M (see _prefill_kernel)
def _w4a16_kernel(
    x_ptr,
    w_ptr,
    scales_ptr,
    pre_quant_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    stride_os,
    GROUP_SIZE: tl.constexpr,
    HAS_PRE_QUANT_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)  # split-K: this program's share of K; partial sums land in out[split]
    HALF_N: tl.constexpr = BLOCK_N // 2
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] activation rows
    pairs = pid_n * HALF_N + tl.arange(0, HALF_N)  # [HALF_N] packed weight rows (output rows 2p, 2p+1)
    row_mask = rows < M
    pair_mask = pairs < N // 2
    even = 2 * pairs.to(tl.int64)
    acc_even = tl.zeros([BLOCK_M, HALF_N], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HALF_N], dtype=tl.float32)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if HAS_PRE_QUANT_SCALE:
            pqs = tl.load(pre_quant_scale_ptr + ks, mask=k_mask, other=0.0)
            x = (x.to(tl.float32) * pqs[None, :]).to(x_ptr.dtype.element_ty)
        w_mask = pair_mask[:, None] & k_mask[None, :]
        packed = tl.load(w_ptr + pairs[:, None].to(tl.int64) * stride_wn + ks[None, :], mask=w_mask, other=0)
        low, high = signed_nibbles(packed)  # [HALF_N, BLOCK_K] each
        if GROUP_SIZE % BLOCK_K == 0:
            # The whole K tile shares one scale column: scale the fp32 partial products.
            group = k0 // GROUP_SIZE
            s_even = tl.load(scales_ptr + even * stride_sn + group, mask=pair_mask, other=0.0)
            s_odd = tl.load(scales_ptr + (even + 1) * stride_sn + group, mask=pair_mask, other=0.0)
            w_even = low.to(x_ptr.dtype.element_ty)  # int4 values are exact in fp16/bf16
            w_odd = high.to(x_ptr.dtype.element_ty)
            acc_even += tl.dot(x, tl.trans(w_even)) * s_even[None, :]
            acc_odd += tl.dot(x, tl.trans(w_odd)) * s_odd[None, :]
        else:
            # Groups smaller than the K tile: dequantize each weight with its own group's scale.
            groups = ks // GROUP_SIZE
            s_even = tl.load(scales_ptr + even[:, None] * stride_sn + groups[None, :], mask=w_mask, other=0.0)
            s_odd = tl.load(scales_ptr + (even + 1)[:, None] * stride_sn + groups[None, :], mask=w_mask, other=0.0)
            w_even = (low.to(tl.float32) * s_even).to(x_ptr.dtype.element_ty)
            w_odd = (high.to(tl.float32) * s_odd).to(x_ptr.dtype.element_ty)
            acc_even += tl.dot(x, tl.trans(w_even))
            acc_odd += tl.dot(x, tl.trans(w_odd))
    if HAS_BIAS:
        acc_even += tl.load(bias_ptr + even, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        acc_odd += tl.load(bias_ptr + even + 1, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & pair_mask[None, :]
    out_rows = out_ptr + split * stride_os + rows[:, None].to(tl.int64) * stride_om
    tl.store(out_rows + even[None, :], acc_even.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(out_rows + (even + 1)[None, :], acc_odd.to(out_ptr.dtype.element_ty), mask=out_mask)


# Above this many rows the product is compute-bound: dequantizing the weight once and running the
# 16-bit tensor-core GEMM beats dequantizing it again in every output tile.
MAX_ROWS_FUSED = 16


def _k_tile(group_size: int) -> int:
    """BLOCK_K of both kernels: power-of-two groups of >= 16 keep each K tile inside one group (the cheap
    path; tl.dot needs K tiles of at least 16); other group sizes take the per-weight path."""
    is_power_of_two = group_size & (group_size - 1) == 0
    return min(128, group_size) if is_power_of_two and group_size >= 16 else 128


def _plan(num_rows: int, n: int, k: int, group_size: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, split_k) for the fused kernel.

    Small batches read every weight byte once, so speed is bandwidth: enough bytes in flight needs
    wide tiles (128 outputs x 128 inputs = 8 KB of packed weight per step) and about four programs
    per SM, which split-K provides when N alone gives too few tiles.
    """
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64
    block_n = 128
    block_k = _k_tile(group_size)
    tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, block_k)
    split_k = max(1, min(4 * num_sms(device) // tiles, k_steps))
    return block_m, block_n, block_k, split_k


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] (fp16/bf16) @ dequant(packed [N / 2, K], scales [N, K / group])^T + bias -> [M, N] in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_rows, k = x.shape
    n = packed.shape[0] * 2
    if num_rows > MAX_ROWS_FUSED:
        if pre_quant_scale is not None:
            x = x * pre_quant_scale
        return torch.nn.functional.linear(x, dequantize_w4(packed, scales, x.dtype), bias)
    group_size = k // scales.shape[1]
    if 0 < num_rows <= MAX_ROWS_GEMV:
        return w4a16_gemv(x, packed, scales, pre_quant_scale, bias, group_size, _k_tile(group_size))
    block_m, block_n, block_k, split_k = _plan(num_rows, n, k, group_size, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    # Split-K writes fp32 partial sums, added up below (deterministic, unlike atomics).
    if split_k == 1:
        out = torch.empty(1, num_rows, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return out[0]
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(n, block_n), split_k)
    _w4a16_kernel[grid](
        x,
        packed,
        scales,
        pre_quant_scale if pre_quant_scale is not None else scales,  # never read without the flag
        bias if bias is not None else scales,
        out,
        num_rows,
        n,
        k,
        k_per_split,
        x.stride(0),
        packed.stride(0),
        scales.stride(0),
        out.stride(1),
        out.stride(0),
        GROUP_SIZE=group_size,
        HAS_PRE_QUANT_SCALE=pre_quant_scale is not None,
        HAS_BIAS=bias is not None and split_k == 1,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=4 if group_size % block_k == 0 else 2,  # per-weight scales need the shared memory
    )
    return out[0] if split_k == 1 else _reduce_splits(out, bias, x.dtype)


def _reduce_splits(partial: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Sum the fp32 split-K partials [split_k, M, N] (in a fixed order: deterministic), add bias, cast."""
    result = partial.sum(dim=0)
    if bias is not None:
        result += bias
    return result.to(dtype)
