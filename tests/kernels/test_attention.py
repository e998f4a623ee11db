"""reference_attention against a naive per-query loop, with and without a paged KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.kernels.attention import AttentionMetadata, reference_attention, store_kv

HEAD_DIM = 8
BLOCK_SIZE = 4


def naive_attention(q, keys, values, context_len, scale, sliding_window):
    """One sequence, float64, one query and head at a time: q [n, H, D], keys/values [L, KV, D]."""
    num_new, num_heads, _ = q.shape
    group = num_heads // keys.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(num_new):
        pos = context_len - num_new + i
        first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
        for h in range(num_heads):
            k = keys[first : pos + 1, h // group].double()
            v = values[first : pos + 1, h // group].double()
            probs = torch.softmax(k @ q[i, h].double() * scale, dim=0)
            out[i, h] = probs @ v
    return out


def random_heads(num_tokens, num_heads, generator):
    return torch.randn(num_tokens, num_heads, HEAD_DIM, generator=generator)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_prefill_without_cache_matches_naive(num_heads, num_kv_heads, sliding_window):
    generator = torch.Generator().manual_seed(0)
    seq_lens = [3, 7, 1, 5]
    total = sum(seq_lens)
    q = random_heads(total, num_heads, generator)
    k = random_heads(total, num_kv_heads, generator)
    v = random_heads(total, num_kv_heads, generator)
    metadata = AttentionMetadata.for_prefill(seq_lens, "cpu")
    scale = 1 / math.sqrt(HEAD_DIM)

    out = reference_attention(q, k, v, metadata, scale=scale, sliding_window=sliding_window)

    assert out.shape == q.shape and out.dtype == q.dtype
    start = 0
    for n in seq_lens:
        s = slice(start, start + n)
        expected = naive_attention(q[s], k[s], v[s], n, scale, sliding_window)
        torch.testing.assert_close(out[s].double(), expected, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize(
    "query_lens",
    [[1, 1, 4, 3], [1, 1, 1, 1]],  # mixed: a decode, a first token, two chunks; all decodes: the batched path
    ids=["mixed", "decode"],
)
def test_with_cache_matches_naive(num_heads, num_kv_heads, sliding_window, query_lens):
    """Each sequence has cached context and some new tokens; the new k/v are stored, then attended."""
    generator = torch.Generator().manual_seed(1)
    context_lens = [9, 1, 6, 12]  # after this step
    block_tables = [[3, 0, 7], [5], [1, 9], [8, 2, 6]]
    num_blocks = 10
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    full_k = [random_heads(n, num_kv_heads, generator) for n in context_lens]
    full_v = [random_heads(n, num_kv_heads, generator) for n in context_lens]

    def slots(i, start, end):
        return [block_tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]

    # The cached part, written as earlier steps would have.
    for i, (L, n) in enumerate(zip(context_lens, query_lens)):
        cached_slots = torch.tensor(slots(i, 0, L - n), dtype=torch.int64)
        store_kv(full_k[i][: L - n], full_v[i][: L - n], k_cache, v_cache, cached_slots)
    new_k = torch.cat([fk[L - n :] for fk, L, n in zip(full_k, context_lens, query_lens)])
    new_v = torch.cat([fv[L - n :] for fv, L, n in zip(full_v, context_lens, query_lens)])
    q = random_heads(sum(query_lens), num_heads, generator)
    slot_mapping = [s for i, (L, n) in enumerate(zip(context_lens, query_lens)) for s in slots(i, L - n, L)]
    metadata = AttentionMetadata.build(query_lens, context_lens, "cpu", slot_mapping, block_tables)
    scale = 0.3

    out = reference_attention(
        q, new_k, new_v, metadata, scale=scale, sliding_window=sliding_window, k_cache=k_cache, v_cache=v_cache
    )

    assert not out.isnan().any()
    start = 0
    for i, (L, n) in enumerate(zip(context_lens, query_lens)):
        expected = naive_attention(q[start : start + n], full_k[i], full_v[i], L, scale, sliding_window)
        torch.testing.assert_close(out[start : start + n].double(), expected, atol=1e-5, rtol=1e-5)
        start += n


def test_store_kv_skips_negative_slots():
    k_cache, v_cache = torch.zeros(2, BLOCK_SIZE, 1, HEAD_DIM), torch.zeros(2, BLOCK_SIZE, 1, HEAD_DIM)
    k = torch.arange(4.0)[:, None, None].expand(4, 1, HEAD_DIM) + 1
    store_kv(k, -k, k_cache, v_cache, torch.tensor([-1, 5, -1, 2]))
    flat_k = k_cache.view(-1, HEAD_DIM)[:, 0]
    assert flat_k.tolist() == [0, 0, 4, 0, 0, 2, 0, 0]
    assert (v_cache.view(-1, HEAD_DIM)[:, 0] == -flat_k).all()


def test_metadata_for_prefill_values():
    metadata = AttentionMetadata.for_prefill([3, 5, 2], "cpu")
    assert metadata.cu_seqlens_q.tolist() == [0, 3, 8, 10]
    assert metadata.cu_seqlens_q.dtype == torch.int32 and metadata.seq_lens.dtype == torch.int32
    assert metadata.seq_lens.tolist() == [3, 5, 2]
    assert metadata.cu_seqlens_q_host == [0, 3, 8, 10] and metadata.seq_lens_host == [3, 5, 2]
    assert metadata.slot_mapping is None and metadata.block_tables is None
    assert metadata.num_seqs == 3 and metadata.num_tokens == 10


def test_metadata_build_pads_block_tables_and_checks_lengths():
    metadata = AttentionMetadata.build([1, 2], [5, 2], "cpu", [9, 4, 5], [[2, 3], [1]])
    assert metadata.block_tables.tolist() == [[2, 3], [1, 0]]
    assert metadata.block_tables.dtype == torch.int32 and metadata.slot_mapping.dtype == torch.int64
    with pytest.raises(ValueError, match="slots"):
        AttentionMetadata.build([1, 2], [5, 2], "cpu", [9, 4], [[2, 3], [1]])
    with pytest.raises(ValueError, match="exceeds"):
        AttentionMetadata.build([3], [2], "cpu")
