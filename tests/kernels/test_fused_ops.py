"""Fused Triton add + RMSNorm, SiLU-and-mul and rotary embedding against their PyTorch references."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from kiln.models import layers
from kiln.models.layers import rms_norm_reference, silu_and_mul_reference
from kiln.models.rotary import default_inv_freq, rotary_reference

# KILN_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs these in the Triton interpreter (slow, for development).
DEVICE = torch.device(os.environ.get("KILN_TEST_DEVICE", "cuda"))
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NUM_TOKENS = [1, 7, 300]
LLAMA3 = (32, 8, 128)  # num_heads, num_kv_heads, head_dim
SMOLLM2 = (9, 3, 64)
MAX_POSITIONS = 8192


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units in the last place of expected's dtype, at expected's magnitude."""
    finfo = torch.finfo(expected.dtype)
    expected32 = expected.float()
    _, exponent = torch.frexp(expected32.abs().clamp_min(finfo.smallest_normal))  # |e| = m * 2^exp, m in [0.5, 1)
    ulp = torch.ldexp(torch.full_like(expected32, finfo.eps), exponent - 1)
    return (actual.float() - expected32).abs() / ulp


@pytest.fixture(autouse=True)
def interpreter_rounds_bf16_like_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton interpreter truncates fp32 -> bf16 where GPUs round to nearest even: make it round too.

    Otherwise bf16 results that are bit-identical on a GPU would be an ulp off under TRITON_INTERPRET=1.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def cast_rtne(self: object, src: interpreter.TensorHandle, dst_type: tl.dtype) -> interpreter.TensorHandle:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_rtne)


def fused_ops():
    """The Triton kernels' module, imported by the GPU tests only: a CPU machine may have no triton."""
    from kiln.kernels import triton_fused_ops

    return triton_fused_ops


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Standard normal values on DEVICE, reproducible per seed."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def rms_norm_one_ulp_off(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> list[torch.Tensor]:
    """The reference's output with its normalised value (before the weight) one ulp down, as is, one ulp up."""
    s = x if residual is None else x + residual
    s32 = s.float()
    normed = (s32 * torch.rsqrt(s32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    inf = torch.full_like(normed, float("inf"))
    return [weight * n for n in (torch.nextafter(normed, -inf), normed, torch.nextafter(normed, inf))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 8192])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_add_rms_norm(dtype: torch.dtype, hidden: int, num_tokens: int, with_residual: bool) -> None:
    """The sum is bit-identical, the normed output too but where the fp32 sum of squares rounds differently."""
    x = randn(num_tokens, hidden, dtype=dtype, seed=hidden + num_tokens) * 3
    residual = randn(num_tokens, hidden, dtype=dtype, seed=1) if with_residual else None
    weight = (1 + 0.3 * randn(hidden, dtype=torch.float32, seed=2)).to(dtype)
    out, new_residual = fused_ops().fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_residual = rms_norm_reference(x, residual, weight, 1e-5)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    if with_residual:
        assert torch.equal(new_residual, ref_residual)
    else:
        assert new_residual is x
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        return
    # A different summation order can move the rounded normalised value by one ulp (a few values in 1e5),
    # which the weight's product can make two ulps of the output: allow exactly that, nothing more.
    candidates = rms_norm_one_ulp_off(x, residual, weight, 1e-5)
    assert bool(torch.stack([out == c for c in candidates]).any(dim=0).all())
    assert (out == ref_out).float().mean().item() > 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1536, 3584])  # SmolLM2's intermediate size, Llama-3-8B's at TP=4
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul(dtype: torch.dtype, d: int, num_tokens: int) -> None:
    """One rounding: within an ulp of the fp32 result; the reference's two roundings stay within two."""
    x = randn(num_tokens, 2 * d, dtype=dtype, seed=d + num_tokens) * 4
    out = fused_ops().silu_and_mul(x)
    assert out.shape == (num_tokens, d) and out.dtype == dtype
    exact = silu_and_mul_reference(x.float())
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, silu_and_mul_reference(x), rtol=1e-5, atol=1e-6)
        return
    assert ulps(out, exact.to(dtype)).max().item() <= 1
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, silu_and_mul_reference(x), rtol=2 * eps, atol=1e-5)


def rotary_tables(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-3's cos/sin tables [MAX_POSITIONS, head_dim // 2] fp32, as RotaryEmbedding builds them."""
    freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float32), default_inv_freq(head_dim, 500000.0))
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [LLAMA3, SMOLLM2], ids=["llama3", "smollm2"])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rotary_embedding(dtype: torch.dtype, heads: tuple[int, int, int], num_tokens: int) -> None:
    """q and k rotated in place inside the fused qkv tensor; v untouched; within an ulp of fp32 rotation."""
    num_heads, num_kv_heads, head_dim = heads
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = randn(num_tokens, sum(widths), dtype=dtype, seed=num_tokens + head_dim)
    before = qkv.clone()
    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    positions = torch.randint(0, 8000, (num_tokens,), generator=gen, device=DEVICE)
    cos_cache, sin_cache = rotary_tables(head_dim)
    q, k, v = qkv.split(widths, dim=1)  # column slices: row stride sum(widths)
    fused_ops().rotary_embedding_(positions, q, k, cos_cache, sin_cache, head_dim)

    assert torch.equal(v, before.split(widths, dim=1)[2])
    q0, k0, _ = before.split(widths, dim=1)
    exact_q, exact_k = rotary_reference(positions, q0.float(), k0.float(), cos_cache, sin_cache, head_dim)
    ref_q, ref_k = rotary_reference(positions, q0, k0, cos_cache, sin_cache, head_dim)
    if dtype == torch.float32:
        torch.testing.assert_close(q, exact_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, exact_k, rtol=1e-5, atol=1e-5)
        return
    # Against fp32 rotation rounded once: an ulp, or fp32's own error where the two products cancel.
    for out, exact in ((q, exact_q), (k, exact_k)):
        rounded = exact.to(dtype)
        assert bool(((ulps(out, rounded) <= 1) | ((out.float() - rounded.float()).abs() <= 1e-6)).all())
    # The reference rounds cos/sin and each product to 16 bits: a few ulps of |x|, so an absolute tolerance.
    atol = 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(q, ref_q, rtol=2 * torch.finfo(dtype).eps, atol=atol)
    torch.testing.assert_close(k, ref_k, rtol=2 * torch.finfo(dtype).eps, atol=atol)


def test_fused_ops_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors and KILN_DISABLE_FUSED_OPS=1 take the PyTorch path."""
    layers._fused_ops_allowed.cache_clear()
    monkeypatch.setenv("KILN_DISABLE_FUSED_OPS", "1")
    assert not layers._fused_ops_allowed()
    layers._fused_ops_allowed.cache_clear()
    monkeypatch.delenv("KILN_DISABLE_FUSED_OPS")
    # Allowed wherever triton is installed (the CPU test machine may have none).
    assert layers._fused_ops_allowed() == (importlib.util.find_spec("triton") is not None)
    assert not layers.use_fused_ops(torch.zeros(2, 4))
    layers._fused_ops_allowed.cache_clear()
