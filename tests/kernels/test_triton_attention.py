"""Triton paged attention and KV store against the PyTorch reference, on random ragged batches."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

from kiln.kernels.attention import AttentionMetadata, reference_attention, store_kv
from kiln.kernels.triton_paged_attention import (
    triton_attention_unsupported,
    triton_paged_attention,
    triton_store_kv,
)

# KILN_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs these in the Triton interpreter (slow, for development).
DEVICE = torch.device(os.environ.get("KILN_TEST_DEVICE", "cuda"))
BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
LLAMA3 = (32, 8, 128)  # num_heads, num_kv_heads, head_dim
SMOLLM2 = (9, 3, 64)
MHA = (8, 8, 128)


@dataclass
class Case:
    """One step's inputs: q/k/v as views of a fused qkv tensor, caches full of random history."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], not contiguous
    v_cache: torch.Tensor
    metadata: AttentionMetadata


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    block_size: int,
    seed: int,
    cache_dtype: torch.dtype | None = None,
) -> Case:
    """Random q/k/v and history; each sequence gets shuffled, non-contiguous block ids (block 0 unused)."""
    num_heads, num_kv_heads, head_dim = heads
    rng = random.Random(seed)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 7  # a few blocks nobody owns
    block_ids = list(range(1, num_blocks))
    rng.shuffle(block_ids)
    tables, slots = [], []
    for q_len, seq_len, count in zip(query_lens, seq_lens, blocks_per_seq):
        table, block_ids = block_ids[:count], block_ids[count:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    num_tokens = sum(query_lens)
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(widths), generator=gen, device=DEVICE, dtype=dtype)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split(widths, dim=1))
    # One tensor holding K and V per block: the caches' block stride is twice their block's size.
    kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    kv = kv.to(cache_dtype or dtype)
    metadata = AttentionMetadata.build(query_lens, seq_lens, DEVICE, slot_mapping=slots, block_tables=tables)
    return Case(q, k, v, kv[:, 0], kv[:, 1], metadata)


def poison_unused_slots(case: Case) -> None:
    """NaN in every cache slot outside the sequences' contexts (the rest of their last blocks, blocks nobody
    owns): stale values a kernel may load but must not let into its output (0 * NaN is NaN)."""
    block_size = case.k_cache.shape[1]
    used = torch.zeros(case.k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for table, seq_len in zip(case.metadata.block_tables.tolist(), case.metadata.seq_lens_host):
        for position in range(seq_len):
            used[table[position // block_size], position % block_size] = True
    for cache in (case.k_cache, case.v_cache):
        if cache.dtype == FP8:  # no masked fill for FP8 tensors: write the bits of its NaN
            cache.view(torch.uint8)[~used] = 0x7F
        else:
            cache[~used] = float("nan")


def check_attention(
    case: Case,
    sliding_window: int | None,
    num_splits: int | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Triton output and caches against the reference computed in fp32 on the same (rounded) inputs."""
    scale = 1 / math.sqrt(case.q.shape[-1])
    fp8 = case.k_cache.dtype == FP8
    # An FP8 cache stays FP8 for the reference (it quantizes the same way); others are widened to fp32.
    k_cache_ref = case.k_cache.clone() if fp8 else case.k_cache.float()
    v_cache_ref = case.v_cache.clone() if fp8 else case.v_cache.float()
    k_scale, v_scale = kv_scales
    expected = reference_attention(
        case.q.float(), case.k.float(), case.v.float(), case.metadata, scale=scale, sliding_window=sliding_window,
        k_cache=k_cache_ref, v_cache=v_cache_ref, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    out = torch.full(case.q.shape, float("nan"), dtype=case.q.dtype, device=DEVICE)  # unwritten rows show
    result = triton_paged_attention(
        case.q, case.k, case.v, case.metadata, scale=scale, sliding_window=sliding_window,
        k_cache=case.k_cache, v_cache=case.v_cache, k_scale=k_scale, v_scale=v_scale, out=out, num_splits=num_splits,
    )  # fmt: skip
    assert result is out and out.dtype == case.q.dtype
    for cache, cache_ref in ((case.k_cache, k_cache_ref), (case.v_cache, v_cache_ref)):  # NaN: poisoned slots
        torch.testing.assert_close(cache.float(), cache_ref.float(), rtol=0, atol=0, equal_nan=True)
    assert not out.isnan().any(), f"{out.isnan().any(-1).any(-1).sum()} token rows not written"
    error = out.float() - expected
    relative = (error.norm() / expected.norm()).item()
    max_abs = error.abs().max().item()
    assert relative < (1e-2 if case.q.dtype == BF16 else 3e-3), f"relative error {relative:.2e}"
    assert max_abs < (2e-2 if case.q.dtype == BF16 else 1e-2), f"max abs error {max_abs:.2e}"


def random_lengths(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    """`count` lengths in [low, high], both ends included once there are at least three."""
    lengths = [rng.randint(low, high) for _ in range(count)]
    if count >= 3:
        lengths[:2] = [low, high]
        rng.shuffle(lengths)
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_matches_reference_exactly(dtype, block_size):
    case = make_case([40, 1, 23], [40, 100, 60], LLAMA3, dtype, block_size, seed=1)
    slots = case.metadata.slot_mapping.clone()
    slots[::5] = -1  # padding tokens: their slots are skipped
    k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
    store_kv(case.k, case.v, k_ref, v_ref, slots)
    triton_store_kv(case.k, case.v, case.k_cache, case.v_cache, slots)
    assert torch.equal(case.k_cache, k_ref) and torch.equal(case.v_cache, v_ref)


DECODE_CASES = [
    # num_seqs, heads, dtype, block_size
    (1, LLAMA3, BF16, 16),
    (7, LLAMA3, FP16, 16),
    (64, LLAMA3, BF16, 16),
    (64, SMOLLM2, BF16, 16),
    (13, SMOLLM2, FP16, 32),
    (5, MHA, BF16, 32),
    (32, (8, 8, 64), FP16, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs,heads,dtype,block_size", DECODE_CASES)
def test_decode_matches_reference(num_seqs, heads, dtype, block_size):
    seq_lens = random_lengths(random.Random(num_seqs), num_seqs, 1, 3000)
    check_attention(make_case([1] * num_seqs, seq_lens, heads, dtype, block_size, seed=num_seqs), None)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "block_n,num_warps,num_stages,min_rows",
    [(32, 2, 2, 16), (32, 4, 3, 16), (64, 8, 2, 16), (128, 4, 2, 16), (128, 8, 3, 16), (16, 1, 2, 4), (32, 1, 3, 4),
     (64, 1, 2, 4), (32, 2, 2, 4), (64, 4, 3, 4)],
)  # fmt: skip
@pytest.mark.parametrize("cache_dtype", [BF16, FP8])
def test_decode_tile_settings(block_n, num_warps, num_stages, min_rows, cache_dtype, monkeypatch):
    # Any tile the sweep may pick for DECODE_TILES computes the same attention, with and without splits.
    from kiln.kernels.triton_decode_attention import DecodeTile

    tile = DecodeTile(block_n, num_warps, num_stages, min_rows)
    monkeypatch.setattr("kiln.kernels.triton_decode_attention.DECODE_TILES", {1: tile, 2: tile})
    seq_lens = random_lengths(random.Random(12), 24, 1, 3000)
    for num_splits in (1, 3):
        case = make_case([1] * 24, seq_lens, LLAMA3, BF16, 16, seed=12, cache_dtype=cache_dtype)
        check_attention(case, None, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs,heads,dtype", [(16, LLAMA3, BF16), (3, SMOLLM2, FP16)])
def test_decode_sliding_window(num_seqs, heads, dtype):
    seq_lens = random_lengths(random.Random(2), num_seqs, 1, 3000)
    check_attention(make_case([1] * num_seqs, seq_lens, heads, dtype, 16, seed=2), sliding_window=256)


@pytest.mark.gpu
@pytest.mark.parametrize("merge_in_kernel", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_decode_fixed_splits_any_context(num_splits, merge_in_kernel, monkeypatch):
    # As under a captured CUDA graph: the split count is fixed while contexts vary (many splits empty).
    # merge_in_kernel: the split kernel's last program merges (KILN_DECODE_MERGE_IN_KERNEL=1).
    monkeypatch.setenv("KILN_DECODE_MERGE_IN_KERNEL", "1" if merge_in_kernel else "0")
    seq_lens = [1, 2, 17, 64, 65, 300, 2999]
    check_attention(make_case([1] * 7, seq_lens, LLAMA3, BF16, 16, seed=3), None, num_splits=num_splits)
    for heads, dtype in [(SMOLLM2, FP16), (MHA, FP16)]:  # groups of 3 (padded to 16 rows) and of 1
        check_attention(make_case([1] * 7, seq_lens, heads, dtype, 16, seed=4), None, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("grid_order", ["heads", "seqs"])
@pytest.mark.parametrize("merge_in_kernel", [False, True])
def test_decode_grid_orders(grid_order, merge_in_kernel, monkeypatch):
    # KILN_DECODE_GRID: a sequence's KV heads or the sequences fastest in the grid; same attention either way,
    # with one split, several, and the split kernel merging them itself.
    monkeypatch.setenv("KILN_DECODE_GRID", grid_order)
    monkeypatch.setenv("KILN_DECODE_MERGE_IN_KERNEL", "1" if merge_in_kernel else "0")
    seq_lens = [1, 17, 300, 2999, 64]
    for num_splits in (1, 3):
        for heads, dtype, cache_dtype in [(LLAMA3, BF16, None), (LLAMA3, FP16, FP8), (SMOLLM2, FP16, None)]:
            case = make_case([1] * 5, seq_lens, heads, dtype, 16, seed=5, cache_dtype=cache_dtype)
            check_attention(case, None, num_splits=num_splits)


PREFILL_CASES = [
    # heads, dtype, block_size, sliding_window
    (LLAMA3, BF16, 16, None),
    (LLAMA3, FP16, 32, 256),
    (SMOLLM2, BF16, 16, None),
    (SMOLLM2, FP16, 16, 256),
    (MHA, BF16, 32, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("heads,dtype,block_size,sliding_window", PREFILL_CASES)
def test_prefill_without_history(heads, dtype, block_size, sliding_window):
    prompt_lens = random_lengths(random.Random(4), 6, 1, 700)
    case = make_case(prompt_lens, prompt_lens, heads, dtype, block_size, seed=4)
    check_attention(case, sliding_window)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,dtype,block_size,sliding_window", PREFILL_CASES)
def test_chunked_prefill_over_cached_tokens(heads, dtype, block_size, sliding_window):
    rng = random.Random(5)
    query_lens = random_lengths(rng, 6, 1, 300)
    cached_lens = random_lengths(rng, 6, 0, 1500)
    seq_lens = [q + c for q, c in zip(query_lens, cached_lens)]
    check_attention(make_case(query_lens, seq_lens, heads, dtype, block_size, seed=5), sliding_window)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,dtype,sliding_window", [(LLAMA3, BF16, None), (SMOLLM2, FP16, 256)])
def test_mixed_decode_and_prefill(heads, dtype, sliding_window):
    rng = random.Random(6)
    decode = [(1, rng.randint(1, 3000)) for _ in range(9)]
    prefill = [(n, n) for n in (1, 5, 300, 700)]
    chunked = [(q, q + rng.randint(1, 1500)) for q in (1, 16, 17, 200)]
    batch = decode + prefill + chunked
    rng.shuffle(batch)
    case = make_case([q for q, _ in batch], [s for _, s in batch], heads, dtype, 16, seed=6)
    check_attention(case, sliding_window)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.05, 0.02)])
def test_store_kv_fp8_matches_reference_exactly(kv_scales):
    case = make_case([40, 1, 23], [40, 100, 60], LLAMA3, BF16, 16, seed=9, cache_dtype=FP8)
    case.k[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, 3.0])  # out of range saturates at +-448 * scale
    k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
    store_kv(case.k, case.v, k_ref, v_ref, case.metadata.slot_mapping, *kv_scales)
    triton_store_kv(case.k, case.v, case.k_cache, case.v_cache, case.metadata.slot_mapping, *kv_scales)
    assert torch.equal(case.k_cache.float(), k_ref.float()) and torch.equal(case.v_cache.float(), v_ref.float())
    assert not k_ref.float().isnan().any() and k_ref.float().abs().max() == 448.0


@pytest.mark.gpu
@pytest.mark.parametrize("fp8_as_fp16", [False, True])
@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.5, 0.25)])
def test_fp8_kv_cache_decode_and_prefill(kv_scales, fp8_as_fp16, monkeypatch):
    # fp8_as_fp16: the decode kernel's products in fp16 (KILN_DECODE_FP8_AS_FP16=1).
    monkeypatch.setenv("KILN_DECODE_FP8_AS_FP16", "1" if fp8_as_fp16 else "0")
    rng = random.Random(10)
    decode_lens = random_lengths(rng, 16, 1, 3000)
    case = make_case([1] * 16, decode_lens, LLAMA3, BF16, 16, seed=10, cache_dtype=FP8)
    check_attention(case, None, kv_scales=kv_scales)
    batch = [(1, 900), (300, 300), (64, 1000), (17, 17)]
    case = make_case([q for q, _ in batch], [s for _, s in batch], SMOLLM2, BF16, 16, seed=11, cache_dtype=FP8)
    check_attention(case, 256, kv_scales=kv_scales)


@pytest.mark.gpu
def test_poisoned_history_stays_out_of_attention():
    # NaN in every cache slot outside the contexts (stale values of freed blocks can be anything): the slots
    # past a sequence's end share its last block and the kernels' tiles, and must stay out of the output.
    batch = [(1, 100), (1, 31), (50, 50), (7, 300)]
    for cache_dtype in (BF16, FP8):
        case = make_case(
            [q for q, _ in batch], [s for _, s in batch], LLAMA3, BF16, 16, seed=14, cache_dtype=cache_dtype
        )
        poison_unused_slots(case)
        check_attention(case, None)


@pytest.mark.gpu
def test_mostly_decode_batch_uses_small_tiles():
    # Speculative-decoding-like steps: every sequence brings 1..16 tokens (16-query tiles).
    rng = random.Random(7)
    query_lens = [rng.randint(1, 16) for _ in range(20)]
    seq_lens = [q + rng.randint(0, 2000) for q in query_lens]
    check_attention(make_case(query_lens, seq_lens, LLAMA3, BF16, 16, seed=7), None)


def compiled_variants(kernel) -> int:
    """How many specialisations of a Triton kernel have been compiled in this process (every device)."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def assert_compiled_once(kernel, steps: list[tuple[list[int], list[int]]], num_splits: int | None = None) -> None:
    """Every step (query lengths, context lengths) runs `kernel` without compiling it again after the first."""
    before = None
    for query_lens, seq_lens in steps:
        check_attention(make_case(query_lens, seq_lens, LLAMA3, BF16, 16, seed=8), None, num_splits=num_splits)
        before = compiled_variants(kernel) if before is None else before
        assert compiled_variants(kernel) == before, (query_lens, seq_lens)


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
def test_prefill_steps_of_any_size_reuse_one_compiled_kernel():
    # A serving engine's steps bring 1, 16, 17, ... query tiles, and block tables 1, 16, 44, ... blocks
    # wide. Specialised on those integers, the kernel would compile again for each class (== 1, divisible
    # by 16, other): a stall of ~1 s mid-serving (docs/benchmarks.md round 8 caught one on a 64-block
    # table). Prompts > 16 tokens take 64-query tiles; shorter ones 16-query tiles, a kernel of their own.
    from kiln.kernels.triton_prefill_attention import _prefill_kernel

    long_prompts = [[17], [64] * 16, [64] * 16 + [17], [700, 17], [256, 17], [1024], [1000, 1000]]
    assert_compiled_once(_prefill_kernel, [(lens, lens) for lens in long_prompts])
    short_prompts = [([4], [4]), ([8, 3], [256, 3]), ([16], [70]), ([5, 1], [1024, 16])]
    assert_compiled_once(_prefill_kernel, short_prompts)


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_eager_decode_steps_of_any_width_reuse_one_compiled_kernel(num_splits):
    # Decode steps past the largest CUDA graph run eagerly: block tables of 1, 16, 64 or 5 blocks.
    from kiln.kernels.triton_decode_attention import _decode_split_kernel

    steps = [([1] * n, lens) for n, lens in ((3, [9, 2, 16]), (2, [256, 30]), (4, [1024, 5, 7, 900]), (1, [70]))]
    assert_compiled_once(_decode_split_kernel, steps, num_splits=num_splits)


@pytest.mark.gpu
def test_head_dim_padded_to_power_of_two():
    # head_dim 96 (Phi-3-mini-like) runs padded to 128 in both kernels.
    heads = (12, 4, 96)
    check_attention(make_case([1] * 5, [1, 40, 700, 1000, 2500], heads, BF16, 16, seed=8), None)
    check_attention(make_case([300, 20], [300, 900], heads, BF16, 16, seed=8), None)


def test_unsupported_reasons():
    # Runs without a GPU: the check itself must work everywhere.
    cpu_reasons = triton_attention_unsupported(128, BF16, 16, torch.device("cpu"))
    assert any("CUDA" in r for r in cpu_reasons)
    fp32_reasons = triton_attention_unsupported(128, torch.float32, 16, "cuda")
    assert any("float32" in r for r in fp32_reasons)
    assert any("head_dim" in r for r in triton_attention_unsupported(512, BF16, 16, "cuda"))
    assert any("block size" in r for r in triton_attention_unsupported(128, BF16, 24, "cuda"))
    assert any("KV cache" in r for r in triton_attention_unsupported(128, BF16, 16, "cuda", torch.float32))
    if torch.cuda.is_available():
        assert triton_attention_unsupported(128, BF16, 16, "cuda") == []
        fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
        assert (triton_attention_unsupported(128, BF16, 16, "cuda", FP8) == []) == fp8_ok
        assert triton_attention_unsupported(64, FP16, 32, "cuda") == []
