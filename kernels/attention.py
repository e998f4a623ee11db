"""Attention over a flat batch of sequences: the step metadata and the PyTorch reference (the oracle).

The reference works on any device and favours clarity: it loops over sequences on the host (using the
host-side copies in the metadata, so it needs no device sync for them) and computes in fp32. Triton
paged-attention kernels are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kiln.core.dtypes import FP8_E4M3_MAX
from kiln.core.host_transfer import pad_rows, to_device


@dataclass
class AttentionMetadata:
    """One forward step's flat batch, shared by all layers."""

    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32: query-token offsets of each sequence
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new tokens)
    slot_mapping: torch.Tensor | None  # [num_tokens] int64: KV slot of each new token; None = no cache
    block_tables: torch.Tensor | None  # [num_seqs, max_blocks_per_seq] int32
    # Host copies of cu_seqlens_q / seq_lens, so the reference path never reads device tensors back.
    cu_seqlens_q_host: list[int]
    seq_lens_host: list[int]
    # Device tensors derived from the host lists, made by the first layer that needs them and reused by the
    # others (e.g. the prefill kernel's tile list: one host-to-device copy a step instead of one a layer).
    derived: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        """Number of new (query) tokens in the batch."""
        return self.cu_seqlens_q_host[-1]

    @classmethod
    def for_prefill(cls, seq_lens: list[int], device: torch.device | str) -> AttentionMetadata:
        """Metadata without KV cache: each sequence attends causally to its own new tokens."""
        return cls.build(query_lens=seq_lens, seq_lens=seq_lens, device=device)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        device: torch.device | str,
        slot_mapping: list[int] | None = None,
        block_tables: list[list[int]] | None = None,
    ) -> AttentionMetadata:
        """Metadata from host lists; ragged block tables are padded with block 0 (never read)."""
        if len(query_lens) != len(seq_lens):
            raise ValueError(f"{len(query_lens)} query lengths for {len(seq_lens)} sequences")
        if any(q > s for q, s in zip(query_lens, seq_lens)):
            raise ValueError(f"a query length exceeds its context length: {query_lens} vs {seq_lens}")
        cu_seqlens = [0]
        for n in query_lens:
            cu_seqlens.append(cu_seqlens[-1] + n)
        slots = None
        if slot_mapping is not None:
            if len(slot_mapping) != cu_seqlens[-1]:
                raise ValueError(f"{len(slot_mapping)} slots for {cu_seqlens[-1]} new tokens")
            slots = to_device(slot_mapping, torch.int64, device)
        tables = None
        if block_tables is not None:
            width = max((len(row) for row in block_tables), default=0)
            tables = to_device(pad_rows(block_tables, len(block_tables), width, 0, torch.int32), torch.int32, device)
        return cls(
            cu_seqlens_q=to_device(cu_seqlens, torch.int32, device),
            seq_lens=to_device(seq_lens, torch.int32, device),
            slot_mapping=slots,
            block_tables=tables,
            cu_seqlens_q_host=cu_seqlens,
            seq_lens_host=list(seq_lens),
        )


class AttentionFunction(Protocol):
    """What an attention backend provides: reference_attention's contract."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor: ...


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x / scale in the cache's dtype; an FP8 cache saturates at its largest finite value."""
    if dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return (x.float() / scale).to(dtype) if scale != 1.0 else x.to(dtype)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write new keys/values into the paged caches at `slot_mapping`; slots < 0 (padding) are skipped.

    The caches hold k / k_scale and v / v_scale (scales are 1 except for an FP8 cache).
    """
    # k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_slots, num_kv_heads, head_dim]
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    # Boolean masking syncs with the device; acceptable for the reference path, not for kernels.
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    flat_k[slots] = to_cache_dtype(k[valid], k_cache.dtype, k_scale)
    flat_v[slots] = to_cache_dtype(v[valid], v_cache.dtype, v_scale)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int, scale: float = 1.0) -> torch.Tensor:
    """The first `context_len` cached entries of one sequence, fp32 and rescaled: [context_len, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, num_kv_heads, head_dim]
    return blocks.flatten(0, 1)[:context_len].float() * scale


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention of each sequence's new tokens over its context.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    caches: [num_blocks, block_size, num_kv_heads, head_dim] or None, holding k / k_scale and
    v / v_scale (an FP8 cache's per-tensor scales). Returns q's shape.
    """
    use_cache = k_cache is not None and v_cache is not None
    if use_cache:
        if metadata.slot_mapping is None or metadata.block_tables is None:
            raise ValueError("attention with a KV cache needs slot_mapping and block_tables")
        store_kv(k, v, k_cache, v_cache, metadata.slot_mapping, k_scale, v_scale)
        if metadata.num_tokens == metadata.num_seqs and metadata.num_seqs > 1:
            # Every sequence brings one token (decode): one batched computation instead of a loop.
            return _decode_batched(q, k_cache, v_cache, metadata, scale, sliding_window, k_scale, v_scale)
    out = torch.empty_like(q)
    cu = metadata.cu_seqlens_q_host
    for i, context_len in enumerate(metadata.seq_lens_host):
        start, end = cu[i], cu[i + 1]
        if end == start:
            continue
        if use_cache:
            keys = gather_kv(k_cache, metadata.block_tables[i], context_len, k_scale)
            values = gather_kv(v_cache, metadata.block_tables[i], context_len, v_scale)
        else:
            keys, values = k[start:end], v[start:end]
        out[start:end] = _attend(q[start:end], keys, values, scale, sliding_window)
    return out


def _decode_batched(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    k_scale: float,
    v_scale: float,
) -> torch.Tensor:
    """One query per sequence over its cached context, all sequences at once, in fp32."""
    # q: [num_seqs, num_heads, head_dim]; the block tables are padded with block 0, masked out below.
    num_seqs, num_heads, _ = q.shape
    max_len = max(metadata.seq_lens_host)
    num_blocks = -(-max_len // k_cache.shape[1])
    tables = metadata.block_tables[:, :num_blocks].long()  # [num_seqs, num_blocks]
    group = num_heads // k_cache.shape[2]
    keys = k_cache[tables].flatten(1, 2)[:, :max_len].float().repeat_interleave(group, dim=2) * k_scale  # [B,L,H,D]
    values = v_cache[tables].flatten(1, 2)[:, :max_len].float().repeat_interleave(group, dim=2) * v_scale
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * scale  # [B, H, L]
    k_pos = torch.arange(max_len, device=q.device)[None, :]  # [1, L]
    lengths = metadata.seq_lens.long()[:, None]  # [B, 1]; the query sits at position length - 1
    allowed = k_pos < lengths
    if sliding_window is not None:
        allowed = allowed & (k_pos > lengths - 1 - sliding_window)
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past a sequence's end were never written for it (padding block 0, stale or unset data):
    # zero them, since a zero probability times a NaN would still be NaN.
    values = values.masked_fill(~allowed[:, :, None, None], 0.0)
    return torch.einsum("bhl,blhd->bhd", probs, values).to(q.dtype)


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One sequence: its last n queries attend over its L context keys, in fp32."""
    # q: [n, num_heads, head_dim]; keys, values: [L, num_kv_heads, head_dim]
    num_new, num_heads, _ = q.shape
    context_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    # Query head h reads kv head h // group (the grouping used by Llama-style GQA checkpoints).
    keys = keys.float().repeat_interleave(group, dim=1)  # [L, num_heads, head_dim]
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale  # [num_heads, n, L]
    q_pos = torch.arange(context_len - num_new, context_len, device=q.device)[:, None]  # [n, 1]
    k_pos = torch.arange(context_len, device=q.device)[None, :]  # [1, L]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
