"""FP8 W8A8 products of a few activation rows (decode) in one Triton launch.

`torch._scaled_mm` needs the activation quantized by a kernel of its own first, and at one to a few rows
cuBLAS splits K too little to keep the weight streaming at the memory bandwidth (2.2 TB/s for the
Llama-3-8B down projection at batch 1 on an H200). Here one kernel quantizes the rows to E4M3 with the
static input scale as it loads them (the same division and rounding as `quantize_fp8_static`), multiplies
them on FP8 tensor cores (the weight tile as the MMA's 64-or-more-row side, the activation rows padded
to 16 with zeros: the tensor cores have compute to spare at this size, what counts is the weight bytes
in flight), splits K over enough programs to fill the GPU, and
reduces the splits in the same launch (`triton_split_k`). Reference: `quantized_gemm.fp8_linear_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel
from kiln.kernels.triton_fp8_quant import FP8_E4M3_MAX
from kiln.kernels.triton_fused_ops import gemv_tile_by_rows, load_gemv_tile
from kiln.kernels.triton_split_k import reduce_split_k, split_k_launch, tile_counters

MAX_ROWS = 16  # one tensor-core tile of rows
# Module level so a tuning sweep (tests/kernels/perf_quantized_gemm.py --sweep) can change them. Swept on
# an H200 (Llama-3-8B layers at batch 1, 2026-11-28): the four layers take 70.8 us against ~77 through
# `_scaled_mm`; at 2 rows the two tie and from 4 rows `_scaled_mm` wins (qkv at 16 rows: 21.5 against
# 8.2 us), so `quantized_gemm.fp8_linear` sends only single rows (`max_rows`) here.
FP8_GEMV_CONFIG = {"max_rows": 1, "block_n": 128, "block_k": 128, "num_warps": 4, "num_stages": 4, "programs_per_sm": 2}


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    input_scale_ptr,
    channel_scale_ptr,
    bias_ptr,
    part_ptr,
    counter_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    num_splits,
    stride_xm,
    stride_wn,
    stride_pm,
    stride_ps,
    stride_om,
    NUM_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    BY_ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    input_scale = tl.load(input_scale_ptr)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    # Swapped operands, out^T = W x^T: the weight tile is the MMA's M side (Hopper's FP8 MMA wants 64 rows
    # there) and the few activation rows its N side, padded only to BLOCK_M.
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = load_gemv_tile(x_ptr, rows, ks, row_mask, k_mask, stride_xm, K, NUM_ROWS, GATED, BY_ROWS)
        x_q = tl.clamp(x.to(tl.float32) / input_scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
        x_q = x_q.to(w_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :], mask=col_mask[:, None] & k_mask[None, :]
        )
        acc += tl.dot(w, tl.trans(x_q))
    part = part_ptr + split * stride_ps + rows[None, :] * stride_pm + cols[:, None]
    tl.store(part, acc, mask=row_mask[None, :] & col_mask[:, None])
    reduce_split_k(
        part_ptr, counter_ptr, out_ptr, bias_ptr, input_scale_ptr, channel_scale_ptr, tile, N, num_splits,
        stride_ps, stride_pm, stride_om, NUM_ROWS=NUM_ROWS, BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S,
        HAS_BIAS=HAS_BIAS, HAS_INPUT_SCALE=True, HAS_COL_SCALE=True,
    )  # fmt: skip


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    channel_scale: torch.Tensor,
    bias: torch.Tensor | None,
    gated: bool = False,
) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] 16-bit; weight float8_e4m3fn [N, K]; scales fp32 ([], [N]) -> [M, N] in x's dtype.

    gated: x is [M, 2K], the [gate | up] rows, and the product takes silu(gate) * up (no SiLU-and-mul launch).
    """
    num_rows, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    n = weight.shape[0]
    if not 0 < num_rows <= MAX_ROWS:
        raise ValueError(f"fp8_gemv takes 1 to {MAX_ROWS} rows, got {num_rows}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    config = FP8_GEMV_CONFIG
    block_n, block_k = config["block_n"], config["block_k"]
    launch = split_k_launch(x, n, k, block_n, block_k, config["programs_per_sm"])
    partial, out = launch.partial, launch.out
    pdl = use_pdl(x.device)
    _fp8_gemv_kernel[launch.grid](
        x, weight, input_scale, channel_scale, bias if bias is not None else channel_scale, partial,
        tile_counters(x.device), out, num_rows, n, k, launch.k_per_split, launch.num_splits,
        x.stride(0), weight.stride(0), partial.stride(1), partial.stride(0), out.stride(0),
        NUM_ROWS=num_rows, BLOCK_M=max(16, triton.next_power_of_2(num_rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_S=triton.next_power_of_2(launch.num_splits), HAS_BIAS=bias is not None, GATED=gated,
        BY_ROWS=gemv_tile_by_rows(), USE_PDL=pdl,
        num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )  # fmt: skip
    return out
