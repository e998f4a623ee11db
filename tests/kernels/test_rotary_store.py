"""Rotary embedding and the KV-cache store in one kernel (`triton_rotary_store`) against the two kernels it
replaces: the same bits in q and in the caches, k left unrotated, padding slots skipped.

GPU tests; KILN_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs the 16-bit cases in the Triton interpreter (it
gets FP8 conversions wrong).
"""

from __future__ import annotations

import os

import pytest
import torch

from kiln.models.rotary import default_inv_freq

DEVICE = torch.device(os.environ.get("KILN_TEST_DEVICE", "cuda"))
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
pytestmark = pytest.mark.gpu
LLAMA3 = (32, 8, 128)  # num_heads, num_kv_heads, head_dim
SMOLLM2 = (9, 3, 64)
CACHE_CASES = [
    (FP16, None, (1.0, 1.0)),
    pytest.param(BF16, None, (1.0, 1.0), marks=pytest.mark.skipif(INTERPRETER, reason="bf16 casts truncate there")),
    pytest.param(BF16, FP8, (0.05, 0.02), marks=pytest.mark.skipif(INTERPRETER, reason="FP8 is wrong there")),
]


def _step(heads: tuple[int, int, int], dtype: torch.dtype, cache_dtype: torch.dtype | None, num_tokens: int = 64):
    """q, k, v [num_tokens, heads, head_dim] as views of one fused qkv tensor (as the engine's), caches of
    random history that share one allocation (strided blocks), and distinct slots with every 5th padding."""
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(widths), generator=gen, device=DEVICE).to(dtype)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split(widths, dim=1))
    num_blocks, block_size = 9, 16
    kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=gen, device=DEVICE)
    kv = kv.to(cache_dtype or dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE)[:num_tokens]
    slots[::5] = -1  # padding rows of a CUDA graph: their queries are rotated, nothing is stored
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, device=DEVICE)
    return q, k, v, kv[:, 0], kv[:, 1], slots, positions


@pytest.mark.parametrize("dtype,cache_dtype,kv_scales", CACHE_CASES)
@pytest.mark.parametrize("heads", [LLAMA3, SMOLLM2], ids=["llama3", "smollm2"])
def test_rotary_and_store_equal_the_two_kernels(dtype, cache_dtype, kv_scales, heads):
    from kiln.kernels.triton_fused_ops import rotary_embedding_
    from kiln.kernels.triton_kv_store import store_kv_triton
    from kiln.kernels.triton_rotary_store import rotary_and_store_kv

    head_dim = heads[2]
    q0, k0, v0, k_cache0, v_cache0, slots, positions = _step(heads, dtype, cache_dtype)
    freqs = torch.outer(torch.arange(4096, dtype=torch.float32), default_inv_freq(head_dim, 500000.0))
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)

    # The two kernels, on copies: rotate q and k in place, then store k and v.
    q, k = q0.clone(), k0.clone()
    k_cache, v_cache = k_cache0.clone(), v_cache0.clone()
    rotary_embedding_(positions, q.flatten(1), k.flatten(1), cos, sin, head_dim)
    store_kv_triton(k, v0, k_cache, v_cache, slots, *kv_scales)

    k_before, k_cache_before = k0.clone(), k_cache0.clone()
    rotary_and_store_kv(positions, q0, k0, v0, cos, sin, k_cache0, v_cache0, slots, *kv_scales)
    assert torch.equal(q0, q)
    assert torch.equal(k0, k_before)  # the rotated keys go to the cache only
    assert torch.equal(k_cache0.float(), k_cache.float()) and torch.equal(v_cache0.float(), v_cache.float())
    assert not torch.equal(k_cache0.float(), k_cache_before.float())  # written at all
