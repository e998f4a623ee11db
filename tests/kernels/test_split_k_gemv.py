"""The decode GEMV kernels (FP8 W8A8, INT4 W4A16) that reduce their split-K partials in the same launch (GPU).

What can go wrong there: a tile reduced before every split arrived, a counter left non-zero for the next
call (wrong answers only from the second call on), a result that depends on which program came last.
"""

from __future__ import annotations

import os

import pytest
import torch
from quantized_weights import random_int4

from kiln.kernels.quantized_gemm import fp8_linear_reference, int4_linear_reference

DEVICE = torch.device(os.environ.get("KILN_TEST_DEVICE", "cuda"))
BF16 = torch.bfloat16
pytestmark = pytest.mark.gpu


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def _fp8_case(m: int, n: int, k: int, with_bias: bool, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    input_scale = torch.tensor(0.01, device=DEVICE)
    channel_scale = torch.rand(n, generator=gen, device=DEVICE) * 1e-3 + 1e-4
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(BF16)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(BF16) if with_bias else None
    return x, weight, input_scale, channel_scale, bias


def _int4_case(m: int, n: int, k: int, with_bias: bool, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    packed, scales = random_int4(n, k, 128, gen, DEVICE)
    pre_quant_scale = (torch.rand(k, generator=gen, device=DEVICE) + 0.5).to(BF16)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(BF16)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(BF16) if with_bias else None
    return x, packed, scales, pre_quant_scale, bias


@pytest.mark.parametrize("m,n,k,with_bias", [(1, 4096, 14336, False), (3, 6144, 4096, True), (16, 1024, 4096, False)])
def test_fp8_gemv_matches_reference_and_repeats_bit_for_bit(m, n, k, with_bias):
    from kiln.kernels.triton_fp8_gemv import fp8_gemv

    args = _fp8_case(m, n, k, with_bias, seed=m + n)
    first = fp8_gemv(*args)
    assert _relative_error(first, fp8_linear_reference(*args)) < 1e-2
    for _ in range(3):  # counters reset by the previous call; same partials, same order: same bits
        assert torch.equal(fp8_gemv(*args), first)


@pytest.mark.parametrize("m,with_bias", [(1, False), (4, True)])
def test_int4_gemv_matches_reference_and_repeats_bit_for_bit(m, with_bias):
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    args = _int4_case(m, 28672, 4096, with_bias, seed=m)
    first = w4a16_linear(*args)
    assert _relative_error(first, int4_linear_reference(*args)) < 1e-2
    for _ in range(3):
        assert torch.equal(w4a16_linear(*args), first)


def test_int4_gemv_rows_equal_their_single_row_products():
    # The weight tile is unpacked once for all rows; each row's sums keep the single-row order.
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    x, packed, scales, pre_quant_scale, bias = _int4_case(4, 6144, 4096, True, seed=5)
    together = w4a16_linear(x, packed, scales, pre_quant_scale, bias)
    alone = torch.cat([w4a16_linear(x[i : i + 1], packed, scales, pre_quant_scale, bias) for i in range(4)])
    assert torch.equal(together, alone)


def test_int4_nibbles_converted_without_int_to_float_equal_the_integer_path():
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear
    from kiln.kernels.triton_w4a16_gemv import GEMV_CONFIG

    args = _int4_case(2, 4096, 4096, False, seed=7)
    with_bits = w4a16_linear(*args)
    GEMV_CONFIG["float_nibbles"] = False
    try:
        with_conversions = w4a16_linear(*args)
    finally:
        GEMV_CONFIG["float_nibbles"] = True
    assert torch.equal(with_bits, with_conversions)  # both conversions are exact; same sums in the same order


def test_gemvs_replay_from_a_cuda_graph_with_new_inputs():
    # Decode runs these kernels from CUDA graphs: several launches per graph share the tile counters.
    from kiln.kernels.triton_fp8_gemv import fp8_gemv
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    fp8_args = list(_fp8_case(2, 4096, 4096, True, seed=11))
    int4_args = list(_int4_case(2, 4096, 4096, True, seed=12))
    x = torch.zeros_like(fp8_args[0])
    fp8_args[0] = int4_args[0] = x
    for _ in range(2):  # compile outside the capture
        fp8_gemv(*fp8_args), w4a16_linear(*int4_args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_out = fp8_gemv(*fp8_args)
        int4_out = w4a16_linear(*int4_args)
        fp8_again = fp8_gemv(*fp8_args)
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen, device=DEVICE))
        graph.replay()
        assert _relative_error(fp8_out, fp8_linear_reference(*fp8_args)) < 1e-2
        assert _relative_error(int4_out, int4_linear_reference(*int4_args)) < 1e-2
        assert torch.equal(fp8_again, fp8_out)
