"""Rotary embedding and the KV-cache store in one Triton kernel (one launch a layer fewer in decode steps).

Unfused, a layer runs `triton_fused_ops.rotary_embedding_` (q and k rotated in place) and then
`triton_kv_store.store_kv_triton` (k and v written into the paged cache). The attention kernels read the
keys from the cache only, so this kernel rotates q in place and writes the rotated keys straight into the
cache (k itself is left as it was). Every value is rounded as the two kernels round it, so the cache and q
hold the same bits either way: the rotated key is rounded to the activations' dtype first, then scaled
and rounded to the cache's dtype. One program per new token; a negative slot (a padding row of a CUDA
graph) rotates its query and writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel
from kiln.kernels.triton_fused_ops import rotary_row, rotate_heads
from kiln.kernels.triton_kv_store import store_scaled


@triton.jit
def _rotary_store_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    inv_k_scale,
    inv_v_scale,
    num_heads,
    num_kv_heads,
    stride_q,
    stride_k,
    stride_v,
    stride_cos,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    IS_FP8: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    cos, sin, half, half_mask = rotary_row(positions_ptr, cos_ptr, sin_ptr, stride_cos, token, HEAD_DIM, BLOCK_HALF)
    rotate_heads(q_ptr + token * stride_q, num_heads, cos, sin, half, half_mask, HEAD_DIM, BLOCK_HQ)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_HK)
    mask = (heads[:, None] < num_kv_heads) & half_mask[None, :] & (slot >= 0)
    k_row = k_ptr + token * stride_k + heads[:, None] * HEAD_DIM + half[None, :]  # [BLOCK_HK, BLOCK_HALF]
    k1 = tl.load(k_row, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_row + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
    dtype = k_ptr.dtype.element_ty  # rounded as rotary_embedding_ leaves them, then as the store rounds
    rotated1 = (k1 * cos - k2 * sin).to(dtype).to(tl.float32)
    rotated2 = (k2 * cos + k1 * sin).to(dtype).to(tl.float32)
    k_dst = k_cache_ptr + block * stride_kc_b + offset * stride_kc_s + heads[:, None] * stride_kc_h + half[None, :]
    store_scaled(k_dst, rotated1, inv_k_scale, mask, IS_FP8)
    store_scaled(k_dst + HEAD_DIM // 2, rotated2, inv_k_scale, mask, IS_FP8)
    v_row = v_ptr + token * stride_v + heads[:, None] * HEAD_DIM + half[None, :]
    v_dst = v_cache_ptr + block * stride_vc_b + offset * stride_vc_s + heads[:, None] * stride_vc_h + half[None, :]
    store_scaled(v_dst, tl.load(v_row, mask=mask, other=0.0).to(tl.float32), inv_v_scale, mask, IS_FP8)
    v2 = tl.load(v_row + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
    store_scaled(v_dst + HEAD_DIM // 2, v2, inv_v_scale, mask, IS_FP8)


def rotary_and_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Rotate q [num_tokens, num_heads, head_dim] in place; write rotated k / k_scale and v / v_scale
    ([num_tokens, num_kv_heads, head_dim]) into the caches [num_blocks, block_size, num_kv_heads, head_dim]
    at `slot_mapping` (slots < 0 skipped). cos/sin tables: [max_positions, head_dim // 2] fp32.

    q, k and v may be views of one fused qkv tensor: rows strided, each row's heads contiguous.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"rotary_and_store_kv needs each token's heads of {name} contiguous")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or cos_cache.stride(-1) != 1:
        raise ValueError("rotary_and_store_kv needs the caches' and the tables' last dimension contiguous")
    if head_dim % 2 or sin_cache.stride() != cos_cache.stride():
        raise ValueError("rotary_and_store_kv needs an even head_dim and cos/sin tables of one layout")
    if num_tokens == 0:
        return
    pdl = use_pdl(q.device)
    _rotary_store_kernel[(num_tokens,)](
        positions, q, k, v, cos_cache, sin_cache, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        num_heads, num_kv_heads, q.stride(0), k.stride(0), v.stride(0), cos_cache.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        IS_FP8=k_cache.dtype == torch.float8_e4m3fn, USE_PDL=pdl,
        num_warps=4 if num_heads * head_dim <= 4096 else 8, launch_pdl=pdl,
    )  # fmt: skip
