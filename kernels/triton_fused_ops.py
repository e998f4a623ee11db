"""A decoder layer's small elementwise ops as one Triton kernel each: add + RMSNorm, SiLU-and-mul, rotary.

References (the CPU path and the tests' oracle): `models.layers.rms_norm_reference`,
`models.layers.silu_and_mul_reference` and `models.rotary.rotary_reference`. Every kernel computes in fp32
and rounds (to nearest even, Triton's default) once per value the reference rounds, except where a
docstring says otherwise. No kernel syncs with the host, and none takes the number of tokens as an
argument (it is the grid), so a bigger batch never makes Triton compile a new specialisation, which
matters when CUDA graphs are captured.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel

SILU_BLOCK = 1024  # columns of the output per SiLU-and-mul program


@triton.jit
def add_rms_norm_row(
    x,
    row,
    cols,
    mask,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    hidden,
    eps,
    stride_r,
    stride_o,
    stride_nr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_SUM: tl.constexpr,
):
    """One row x [BLOCK] (the activations' dtype): adds the residual row, stores the sum (STORE_SUM), and stores
    RMSNorm(sum) * weight. Shared with kernels/triton_peer_reduce.py, which sums x over the ranks first."""
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the activations' dtype before it is normalised, as the reference does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    if STORE_SUM:
        tl.store(new_residual_ptr + row * stride_nr + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    # Normalise in fp32, round to the activations' dtype, then scale by the weight and round again.
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    # One program per token: the whole row [BLOCK] lives in registers (BLOCK >= hidden).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    add_rms_norm_row(
        x, row, cols, mask, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, hidden, eps, stride_r, stride_o,
        stride_nr, HAS_RESIDUAL, HAS_RESIDUAL,
    )  # fmt: skip


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., hidden] (same dtype), weight [hidden] -> (normed, x + residual or x itself)."""
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rms_norm needs x and residual of one dtype, got {x.dtype} and {residual.dtype}")
    hidden = x.shape[-1]
    x2d = _rows(x)
    # A bf16 weight keeps bf16 activations bf16; an fp32 one makes the output fp32, as in the reference.
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is None:
        new_residual = x
        r2d = new_r2d = x2d  # neither read nor written: HAS_RESIDUAL is off
    else:
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        r2d, new_r2d = _rows(residual), new_residual.view(-1, hidden)
    num_rows = x2d.shape[0]
    if num_rows:
        block = triton.next_power_of_2(hidden)
        pdl = use_pdl(x.device)
        _add_rms_norm_kernel[(num_rows,)](
            x2d,
            r2d,
            weight,
            out,
            new_r2d,
            hidden,
            eps,
            x2d.stride(0),
            r2d.stride(0),
            hidden,  # out is contiguous
            new_r2d.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            USE_PDL=pdl,
            num_warps=min(max(block // 512, 1), 16),  # ~16 values of the row per thread
            launch_pdl=pdl,
        )
    return out, new_residual


@triton.jit
def silu_and_mul_at(x_ptr, offsets, mask, d):
    """silu(gate) * up at `offsets` of rows [gate (d) | up (d)], computed in fp32, rounded to x's dtype.

    The one definition of the arithmetic: the SiLU-and-mul kernel and the decode GEMVs that take the
    [gate | up] row directly (GATED) compute the same bits from it.
    """
    gate = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + d + offsets, mask=mask, other=0.0).to(tl.float32)
    return (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty)


@triton.jit
def load_gemv_input(x_ptr, offsets, mask, d, GATED: tl.constexpr):
    """A GEMV's activation at `offsets`: loaded as it is, or (GATED) silu(gate) * up of a [gate | up] row of
    2 * d values, as the SiLU-and-mul kernel would have written it (so a gated GEMV gives the same bits)."""
    if GATED:
        return silu_and_mul_at(x_ptr, offsets, mask, d)
    return tl.load(x_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def load_gemv_tile(
    x_ptr, rows, ks, row_mask, k_mask, stride_xm, d,
    NUM_ROWS: tl.constexpr, GATED: tl.constexpr, BY_ROWS: tl.constexpr,
):  # fmt: skip
    """The [BLOCK_M, BLOCK_K] activation tile of a tensor-core GEMV (rows past NUM_ROWS zero), as load_gemv_input.

    BY_ROWS (always when GATED) builds the tile from the NUM_ROWS real rows, so the compiler knows the
    padding rows are zeros and runs no SiLU nor FP8 quantization on them. By the SASS for sm_90 at one row,
    the FP8 GEMV's loop then has 169 instructions (188 gated), against 268 for the masked tile load (531
    gated). But that load reaches shared memory through the software pipeline's asynchronous copies,
    while rows are loaded synchronously: which is faster is for a GPU to say (KILN_GEMV_TILE_BY_ROWS=1).
    """
    if GATED or BY_ROWS:
        tile = tl.zeros([rows.shape[0], ks.shape[0]], dtype=x_ptr.dtype.element_ty)
        for m in tl.static_range(NUM_ROWS):
            row = load_gemv_input(x_ptr, m * stride_xm + ks, k_mask, d, GATED)
            tile = tl.where((rows == m)[:, None], row[None, :], tile)
        return tile
    return tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)


def gemv_tile_by_rows() -> bool:
    """KILN_GEMV_TILE_BY_ROWS=1: the FP8 and dense GEMVs build their activation tile row by row (A/B runs)."""
    return os.environ.get("KILN_GEMV_TILE_BY_ROWS") == "1"


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    # Grid: (num_tokens, cdiv(d, BLOCK)); gate is x[:, :d], up is x[:, d:].
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    out = silu_and_mul_at(x_ptr, row * stride_x + cols, mask, d)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] -> silu(x[..., :d]) * x[..., d:] as [..., d].

    Computed in fp32 and rounded once; the reference rounds silu(gate) to the activations' dtype before
    the product, so 16-bit results can differ from it by about one unit in the last place.
    """
    d = x.shape[-1] // 2
    x2d = _rows(x)
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    num_rows = x2d.shape[0]
    if num_rows and d:
        grid = (num_rows, triton.cdiv(d, SILU_BLOCK))
        pdl = use_pdl(x.device)
        _silu_and_mul_kernel[grid](
            x2d, out, d, x2d.stride(0), d, BLOCK=SILU_BLOCK, USE_PDL=pdl, num_warps=4, launch_pdl=pdl
        )
    return out


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    num_heads,
    num_kv_heads,
    stride_q,
    stride_k,
    stride_cos,
    HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    # One program per token: cos/sin [BLOCK_HALF] are read once and rotate all its q and k heads.
    token = tl.program_id(0).to(tl.int64)
    cos, sin, half, half_mask = rotary_row(positions_ptr, cos_ptr, sin_ptr, stride_cos, token, HEAD_DIM, BLOCK_HALF)
    rotate_heads(q_ptr + token * stride_q, num_heads, cos, sin, half, half_mask, HEAD_DIM, BLOCK_HQ)
    rotate_heads(k_ptr + token * stride_k, num_kv_heads, cos, sin, half, half_mask, HEAD_DIM, BLOCK_HK)


@triton.jit
def rotary_row(positions_ptr, cos_ptr, sin_ptr, stride_cos, token, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """A token's cos and sin [1, BLOCK_HALF] (fp32, from the tables at its position), the half-dimension
    offsets and their mask."""
    pos = tl.load(positions_ptr + token).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    half_mask = half < HEAD_DIM // 2
    cos = tl.load(cos_ptr + pos * stride_cos + half, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + half, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    return cos, sin, half, half_mask


@triton.jit
def rotate_heads(row_ptr, num_heads, cos, sin, half, half_mask, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    # In place on one token's [num_heads, HEAD_DIM]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_heads) & half_mask[None, :]
    ptr1 = row_ptr + heads[:, None] * HEAD_DIM + half[None, :]  # [BLOCK_H, BLOCK_HALF], first halves
    ptr2 = ptr1 + HEAD_DIM // 2
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
    dtype = row_ptr.dtype.element_ty
    tl.store(ptr1, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(ptr2, (x2 * cos + x1 * sin).to(dtype), mask=mask)


def rotary_embedding_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_dim: int,
) -> None:
    """Rotate q [num_tokens, num_heads * head_dim] and k [num_tokens, num_kv_heads * head_dim] in place.

    q and k may be column slices of one fused qkv tensor (rows strided, columns contiguous): the rotated
    values land in it. cos_cache/sin_cache: [max_positions, head_dim // 2], indexed by positions [num_tokens].
    Computed in fp32 with the fp32 table and rounded once; the reference rounds cos/sin to the activations'
    dtype and rounds each product, so 16-bit results can differ from it by a few units in the last place.
    """
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_cache.stride(-1) != 1 or sin_cache.stride() != cos_cache.stride():
        raise ValueError("rotary_embedding_ needs unit column strides in q, k and the cos/sin tables")
    num_tokens = q.shape[0]
    num_heads, num_kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    if num_tokens:
        pdl = use_pdl(q.device)
        _rotary_kernel[(num_tokens,)](
            positions,
            q,
            k,
            cos_cache,
            sin_cache,
            num_heads,
            num_kv_heads,
            q.stride(0),
            k.stride(0),
            cos_cache.stride(0),
            HEAD_DIM=head_dim,
            BLOCK_HQ=triton.next_power_of_2(num_heads),
            BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            USE_PDL=pdl,
            num_warps=4 if num_heads * head_dim <= 4096 else 8,
            launch_pdl=pdl,
        )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] as [rows, n] with contiguous columns: a view when it can be one, else a copy."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()
