"""16-bit (bf16/fp16) dense products of a few activation rows (decode) in one Triton launch.

At one row cuBLAS reaches ~4.1 TB/s on a Llama-3-8B layer but only ~3.6 TB/s on the half-size weight
shards of two tensor-parallel ranks (H200), presumably too few weight bytes in flight on fewer output
tiles. Here every output tile of BLOCK_N columns is split along K over enough programs to fill the GPU
(`triton_split_k`), and the splits are added up, the bias added and the result cast in the same launch.
Two inner products, chosen by DENSE_GEMV_CONFIG["variant"]:
- "dot": tensor cores with swapped operands, out^T = W x^T, the weight tile as the MMA's M side (64 rows
  or more for Hopper's wgmma) and the activation rows padded to 16 (as `triton_fp8_gemv`); the loads go
  through the software pipeline into shared memory, so `num_stages` weight tiles a program are in flight.
- "fma": CUDA cores, each row multiplied with the weight tile in registers and summed along K (no
  padding rows); the loop carries `num_stages` so Triton pipelines its loads although there is no dot.
Reference: `dense_gemm.dense_linear_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel
from kiln.kernels.triton_fused_ops import gemv_tile_by_rows, load_gemv_input, load_gemv_tile
from kiln.kernels.triton_split_k import reduce_split_k, split_k_launch, tile_counters

MAX_ROWS = 16  # one tensor-core tile of rows ("dot"); "fma" unrolls one multiply-and-sum per row
VARIANTS = ("dot", "fma")
# Module level so a tuning sweep (tests/kernels/perf_dense_gemv.py --sweep) can change it. Not yet swept
# on a GPU: a first guess for Hopper from the FP8 GEMV's sweep (16 KB weight tiles, 4 stages, 2 programs
# an SM), its tile halved along K since bf16 has twice the bytes: 64 x 128 x 2 B a stage; with the
# activation tiles 80 KB of shared memory a program (Triton 3.6 for sm_90), 160 of the 227 KB for two;
# 64 weight rows fill one warpgroup's MMA (wgmma). "fma" is meant for 1 to 4 rows: compiled for 16 it
# spills registers.
DENSE_GEMV_CONFIG = {
    "max_rows": 1,
    "variant": "dot",
    "block_n": 64,
    "block_k": 128,
    "num_warps": 4,
    "num_stages": 4,
    "programs_per_sm": 2,
}


@triton.jit
def _dense_gemv_kernel(
    x_ptr,
    w_ptr,
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
    NUM_STAGES: tl.constexpr,
    USE_DOT: tl.constexpr,
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
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn  # N * K may pass 2^31 elements
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T: [columns, rows]
    # num_stages on the loop itself: without it Triton pipelines only loads that feed a tl.dot.
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        # Each weight byte is read once per call: keep L2 for the activation rows and the partials.
        w = tl.load(
            w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first"
        )
        if USE_DOT:
            x = load_gemv_tile(x_ptr, rows, ks, row_mask, k_mask, stride_xm, K, NUM_ROWS, GATED, BY_ROWS)
            acc += tl.dot(w, tl.trans(x))
        else:
            w32 = w.to(tl.float32)
            for m in tl.static_range(NUM_ROWS):  # the weight tile, loaded once, serves every row
                x = load_gemv_input(x_ptr, m * stride_xm + ks, k_mask, K, GATED).to(tl.float32)
                row_sum = tl.sum(w32 * x[None, :], axis=1)  # [BLOCK_N]
                # A tensor has no per-column assignment: add the row's sums to its column only.
                acc = tl.where((rows == m)[None, :], acc + row_sum[:, None], acc)
    part = part_ptr + split * stride_ps + rows[None, :] * stride_pm + cols[:, None]
    tl.store(part, acc, mask=row_mask[None, :] & col_mask[:, None])
    reduce_split_k(
        part_ptr, counter_ptr, out_ptr, bias_ptr, bias_ptr, bias_ptr, tile, N, num_splits,
        stride_ps, stride_pm, stride_om, NUM_ROWS=NUM_ROWS, BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S,
        HAS_BIAS=HAS_BIAS, HAS_INPUT_SCALE=False, HAS_COL_SCALE=False,
    )  # fmt: skip


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] 16-bit; weight [N, K] row-major, x's dtype; bias [N] or None -> [M, N] in x's dtype.

    gated: x is [M, 2K], the [gate | up] rows, and the product takes silu(gate) * up (no SiLU-and-mul launch).
    """
    num_rows, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    n = weight.shape[0]
    if not 0 < num_rows <= MAX_ROWS:
        raise ValueError(f"dense_gemv takes 1 to {MAX_ROWS} rows, got {num_rows}")
    if weight.shape[1] != k or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(
            f"dense_gemv needs a row-major {x.dtype} weight [N, {k}], got {weight.dtype} {tuple(weight.shape)}"
        )
    config = DENSE_GEMV_CONFIG
    if config["variant"] not in VARIANTS:
        raise ValueError(f"DENSE_GEMV_CONFIG['variant'] must be one of {VARIANTS}, got {config['variant']!r}")
    if x.stride(-1) != 1:
        x = x.contiguous()  # rows may be strided (views of a wider tensor), elements within a row not
    if bias is not None:
        bias = bias.contiguous()
    use_dot = config["variant"] == "dot"
    block_n, block_k = config["block_n"], config["block_k"]
    launch = split_k_launch(x, n, k, block_n, block_k, config["programs_per_sm"])
    partial, out = launch.partial, launch.out
    rows_padded = triton.next_power_of_2(num_rows)
    # At least 16 split slots in the reduction: one compiled kernel serves every layer of up to 16 splits
    # (fewer JIT compilations at warm-up and in a tuning sweep); the unused slots are masked out.
    block_s = max(16, triton.next_power_of_2(launch.num_splits))
    pdl = use_pdl(x.device)
    _dense_gemv_kernel[launch.grid](
        x, weight, bias if bias is not None else out, partial, tile_counters(x.device), out,
        num_rows, n, k, launch.k_per_split, launch.num_splits, x.stride(0), weight.stride(0),
        partial.stride(1), partial.stride(0), out.stride(0),
        NUM_ROWS=num_rows, BLOCK_M=max(16, rows_padded) if use_dot else rows_padded, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_S=block_s, NUM_STAGES=config["num_stages"],
        USE_DOT=use_dot, HAS_BIAS=bias is not None, GATED=gated, BY_ROWS=gemv_tile_by_rows(), USE_PDL=pdl,
        num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )  # fmt: skip
    return out
