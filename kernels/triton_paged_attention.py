"""Paged attention in Triton for CUDA GPUs: the capability check and the entry point that picks a kernel.

Same contract as `attention.reference_attention` with a KV cache. A step where every sequence has one
new token runs the split-KV decode kernel (`triton_decode_attention`); any other step (prefill, chunked
prefill, mixed) runs the tiled prefill kernel (`triton_prefill_attention`). The kernel modules import
triton, so they are imported on first use: this module loads on machines without triton.
"""

from __future__ import annotations

import importlib.util

import torch

from kiln.kernels.attention import AttentionMetadata

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # head_dim is padded to the next power of two inside the kernels


def triton_attention_unsupported(
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
    device: torch.device | str,
    kv_cache_dtype: torch.dtype | None = None,
) -> list[str]:
    """Reasons the Triton paged-attention path cannot run here; empty when it can."""
    reasons = []
    device = torch.device(device)
    if device.type != "cuda":
        reasons.append(f"needs a CUDA device, got {device.type}")
    elif not torch.cuda.is_available():
        reasons.append("needs a CUDA device, but torch sees none")
    if importlib.util.find_spec("triton") is None:
        reasons.append("needs the `triton` package, which is not installed")
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"needs float16 or bfloat16 activations, got {dtype}")
    kv_cache_dtype = kv_cache_dtype or dtype
    if kv_cache_dtype == torch.float8_e4m3fn:
        if reasons[:1] == [] and torch.cuda.get_device_capability(device) < (8, 9):
            reasons.append("an FP8 KV cache needs a GPU with FP8 support (compute capability 8.9+)")
    elif kv_cache_dtype not in SUPPORTED_DTYPES:
        reasons.append(f"needs a float16, bfloat16 or FP8 KV cache, got {kv_cache_dtype}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"needs head_dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1):
        reasons.append(f"needs a KV block size that is a power of two, got {block_size}")
    return reasons


def triton_store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write k / k_scale, v / v_scale [num_tokens, num_kv_heads, head_dim] into the paged caches (slots < 0 skipped)."""
    from kiln.kernels.triton_kv_store import store_kv_triton

    store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def is_decode_step(metadata: AttentionMetadata) -> bool:
    """True when every sequence brings exactly one new token (host lists only, no device sync)."""
    cu = metadata.cu_seqlens_q_host
    return metadata.num_tokens == metadata.num_seqs and all(cu[i] == i for i in range(len(cu)))


def triton_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Store k/v at the step's slots, then causal GQA attention of the new queries over their contexts.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]; caches
    [num_blocks, block_size, num_kv_heads, head_dim] in the model's dtype or FP8 (holding k / k_scale and
    v / v_scale). Returns `out` (allocated if None) in q's shape
    and dtype. `num_splits` fixes the decode kernel's KV splits (for CUDA graphs); None picks it from
    the batch's context lengths. `rotary` (positions, cos table, sin table): q and k come unrotated, and
    one kernel rotates q in place and stores the rotated keys (`triton_rotary_store`).
    """
    from kiln.kernels.triton_decode_attention import decode_attention, decode_num_splits
    from kiln.kernels.triton_prefill_attention import prefill_attention

    if metadata.slot_mapping is None or metadata.block_tables is None:
        raise ValueError("paged attention needs metadata.slot_mapping and metadata.block_tables")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV caches' last dimension (head_dim) must be contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rotary is None:
        triton_store_kv(k, v, k_cache, v_cache, metadata.slot_mapping, k_scale, v_scale)
    else:
        from kiln.kernels.triton_rotary_store import rotary_and_store_kv

        positions, cos_cache, sin_cache = rotary
        rotary_and_store_kv(
            positions, q, k, v, cos_cache, sin_cache, k_cache, v_cache, metadata.slot_mapping, k_scale, v_scale
        )
    if metadata.num_tokens == 0:
        return out
    if is_decode_step(metadata):
        if num_splits is None:
            max_keys = max(metadata.seq_lens_host)
            if sliding_window is not None:
                max_keys = min(max_keys, sliding_window)
            num_splits = decode_num_splits(max_keys, metadata.num_seqs, k_cache.shape[2], q.device)
        decode_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, out,
            scale=scale, sliding_window=sliding_window, num_splits=num_splits, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    else:
        prefill_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, metadata.cu_seqlens_q,
            metadata.cu_seqlens_q_host, metadata.seq_lens_host, out,
            scale=scale, sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale, derived=metadata.derived,
        )  # fmt: skip
    return out
