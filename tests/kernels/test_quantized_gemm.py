"""FP8 and INT4 GEMM kernels against their PyTorch references (GPU), and the references themselves (CPU)."""

from __future__ import annotations

import os

import pytest
import torch
from quantized_weights import random_int4

from kiln.kernels.quantized_gemm import (
    dequantize_int4,
    fp8_linear,
    fp8_linear_reference,
    int4_linear,
    int4_linear_reference,
    quantize_fp8_reference,
    unpack_int4,
)

# KILN_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs the Triton kernels in the interpreter (development).
DEVICE = torch.device(os.environ.get("KILN_TEST_DEVICE", "cuda"))
BF16, FP16 = torch.bfloat16, torch.float16
# FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper); older GPUs have no FP8 path to test.
requires_fp8 = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="no FP8 on this GPU"
)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def test_unpack_int4_layout():
    q = torch.tensor([[-8, 7, 0], [3, -1, -5], [1, 2, -3], [4, 5, 6]], dtype=torch.int16)
    nibbles = (q & 0xF).to(torch.uint8).view(2, 2, 3)
    packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
    assert torch.equal(unpack_int4(packed), q.to(torch.int8))
    scales = torch.tensor([[2.0], [1.0], [0.5], [1.0]])
    assert torch.equal(dequantize_int4(packed, scales), q.float() * scales)


INT4_CASES = [
    # m, n, k, group_size, pre_quant_scale, bias, dtype
    (1, 4096, 4096, 128, False, False, BF16),  # decode, Llama-3-8B o_proj (CUDA-core kernel, split-K)
    (3, 1536, 576, 64, True, True, BF16),
    (4, 256, 576, 96, True, False, FP16),
    (7, 1536, 576, 64, True, False, BF16),  # SmolLM2 gate_up with AWQ scales
    (16, 960, 576, 64, False, True, FP16),  # qkv with bias (Qwen2)
    (33, 576, 1536, 128, True, False, BF16),
    (300, 2048, 1024, 128, True, True, BF16),  # prefill: dequantize once, then cuBLAS
    (64, 256, 512, 32, False, False, FP16),  # groups smaller than the decode K tile
    (5, 256, 576, 96, False, True, BF16),  # a non-power-of-two group: per-weight scales
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group_size,with_pqs,with_bias,dtype", INT4_CASES)
def test_w4a16_gemm_matches_reference(m, n, k, group_size, with_pqs, with_bias, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(m * 7 + n)
    packed, scales = random_int4(n, k, group_size, gen, DEVICE)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    pqs = (torch.rand(k, generator=gen, device=DEVICE) + 0.5).to(dtype) if with_pqs else None
    bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if with_bias else None
    out = int4_linear(x, packed, scales, pqs, bias)
    expected = int4_linear_reference(x, packed, scales, pqs, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert relative_error(out, expected) < 1e-2


@pytest.mark.gpu
def test_w4a16_gemm_on_a_strided_activation():
    # q/k/v-style views with a row stride larger than K.
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    packed, scales = random_int4(256, 128, 64, gen, DEVICE)
    wide = torch.randn(9, 384, generator=gen, device=DEVICE).to(BF16)
    x = wide[:, 128:256]
    assert (
        relative_error(int4_linear(x, packed, scales, None, None), int4_linear_reference(x, packed, scales, None, None))
        < 1e-2
    )


@pytest.mark.gpu
@requires_fp8
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_fp8_activation_quantization_matches_reference_exactly(dtype):
    from kiln.kernels.triton_fp8_quant import quantize_fp8_static

    gen = torch.Generator(device=DEVICE).manual_seed(4)
    x = (torch.randn(37, 3000, generator=gen, device=DEVICE) * 3).to(dtype)
    x[0, :3] = torch.tensor([1e4, -1e4, 0.0])  # saturates at +-448
    scale = torch.tensor(0.02, device=DEVICE)
    x_q, row_scale = quantize_fp8_static(x, scale)
    expected = quantize_fp8_reference(x, scale)
    assert x_q.dtype == torch.float8_e4m3fn and torch.equal(x_q.float(), expected.float())
    assert row_scale.shape == (37, 1) and torch.equal(row_scale, torch.full((37, 1), 0.02, device=DEVICE))


FP8_CASES = [
    # m, n, k, shard scales, bias, dtype
    (1, 4096, 4096, 1, False, BF16),  # one per-tensor scale
    (8, 6144, 4096, 3, False, BF16),  # fused qkv: per-shard scales (row-wise scaling)
    (300, 2 * 1536, 576, 2, True, BF16),  # gate_up with bias, prefill
    (17, 960, 576, 3, True, FP16),  # fp16: per-channel scaling after an fp32 product
    (5, 64, 48, 1, False, BF16),
]


@pytest.mark.gpu
@requires_fp8
@pytest.mark.parametrize("m,n,k,num_shards,with_bias,dtype", FP8_CASES)
def test_fp8_linear_matches_reference(m, n, k, num_shards, with_bias, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(m + n)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    shard_scales = torch.rand(num_shards, generator=gen, device=DEVICE) * 1e-3 + 1e-4
    channel_scale = shard_scales.repeat_interleave(n // num_shards)
    tensor_scale = shard_scales[0].clone() if num_shards == 1 else None
    input_scale = torch.tensor(0.01, device=DEVICE)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if with_bias else None
    out = fp8_linear(x, weight, input_scale, channel_scale, bias, tensor_scale)
    expected = fp8_linear_reference(x, weight, input_scale, channel_scale, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert relative_error(out, expected) < 1e-2


def test_fp8_reference_falls_back_on_cpu():
    # The CPU path is the reference itself (no _scaled_mm); shapes need not be multiples of 16.
    torch.manual_seed(0)
    weight = torch.randn(10, 6).to(torch.float8_e4m3fn)
    x = torch.randn(3, 6)
    args = (torch.tensor(0.05), torch.full((10,), 0.5), None)
    assert torch.equal(fp8_linear(x, weight, *args, None), fp8_linear_reference(x, weight, *args))
