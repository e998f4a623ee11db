"""Triton kernel writing new keys/values into the paged KV cache (reference: `attention.store_kv`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.core.dtypes import FP8_E4M3_MAX
from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel

FP8_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    inv_k_scale,
    inv_v_scale,
    num_kv_heads,
    head_dim,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_FP8: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    # One program per new token: all of its kv heads, [BLOCK_H, BLOCK_D].
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # A negative slot (padding token) masks every lane: nothing is read or written, no branch needed.
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < head_dim) & (slot >= 0)
    k = tl.load(k_ptr + token * stride_k_t + h[:, None] * stride_k_h + d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_v_t + h[:, None] * stride_v_h + d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_b + offset * stride_kc_s + h[:, None] * stride_kc_h + d[None, :]
    v_dst = v_cache_ptr + block * stride_vc_b + offset * stride_vc_s + h[:, None] * stride_vc_h + d[None, :]
    store_scaled(k_dst, k.to(tl.float32), inv_k_scale, mask, IS_FP8)
    store_scaled(v_dst, v.to(tl.float32), inv_v_scale, mask, IS_FP8)


@triton.jit
def store_scaled(cache_ptr, values, inv_scale, mask, IS_FP8: tl.constexpr):
    """values (fp32) / scale into the cache at cache_ptr, rounded to its dtype (nearest even).

    FP8 saturates like the reference: out-of-range values become +-448, never NaN.
    """
    values = values * inv_scale
    if IS_FP8:
        values = tl.clamp(values, -FP8_E4M3_MAX, FP8_E4M3_MAX)
    tl.store(cache_ptr, values.to(cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write k / k_scale, v / v_scale [num_tokens, num_kv_heads, head_dim] into the caches at `slot_mapping`.

    Slots < 0 are skipped. Reference: `attention.store_kv`.
    """
    # caches: [num_blocks, block_size, num_kv_heads, head_dim]; only the last dim must be contiguous.
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV caches' last dimension (head_dim) must be contiguous")
    pdl = use_pdl(k.device)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        1.0 / k_scale,
        1.0 / v_scale,
        num_kv_heads,
        head_dim,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        IS_FP8=k_cache.dtype == torch.float8_e4m3fn,
        USE_PDL=pdl,
        launch_pdl=pdl,
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has stride 1 (views of a fused qkv tensor do), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
