"""The decode GEMV kernels (FP8 W8A8, INT4 W4A16) that reduce their split-K partials in the same launch (GPU).

What can go wrong there: a tile reduced before every split arrived, a counter left non-zero for the next
call (wrong answers only from the second call on), a result that depends on which program came last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def _int4_unpack(unpack: str) -> Iterator[None]:
    """The INT4 GEMV's weight path for every row count ("words", "half2", "floats", "ints"), restored after."""
    from kiln.kernels.triton_w4a16_gemv import FEW_ROWS_GEMV_CONFIG, GEMV_CONFIG

    saved = GEMV_CONFIG["unpack"], FEW_ROWS_GEMV_CONFIG["unpack"]
    GEMV_CONFIG["unpack"] = FEW_ROWS_GEMV_CONFIG["unpack"] = unpack
    try:
        yield
    finally:
        GEMV_CONFIG["unpack"], FEW_ROWS_GEMV_CONFIG["unpack"] = saved


@pytest.mark.parametrize("unpack", ["words", "half2", "floats"])
def test_int4_gemv_rows_equal_their_single_row_products(unpack):
    # The weight tile is unpacked once for all rows; each row's sums keep the single-row order (the row
    # counts' launch settings made equal: the split of K decides the order of the sums).
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear
    from kiln.kernels.triton_w4a16_gemv import FEW_ROWS_GEMV_CONFIG, GEMV_CONFIG

    x, packed, scales, pre_quant_scale, bias = _int4_case(4, 6144, 4096, True, seed=5)
    saved = dict(GEMV_CONFIG)
    GEMV_CONFIG.update(FEW_ROWS_GEMV_CONFIG)
    try:
        with _int4_unpack(unpack):
            together = w4a16_linear(x, packed, scales, pre_quant_scale, bias)
            alone = torch.cat([w4a16_linear(x[i : i + 1], packed, scales, pre_quant_scale, bias) for i in range(4)])
    finally:
        GEMV_CONFIG.update(saved)
    assert torch.equal(together, alone)


@pytest.mark.parametrize("m", [1, 2])
def test_int4_nibbles_converted_without_int_to_float_equal_the_integer_path(m):
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    args = _int4_case(m, 4096, 4096, False, seed=7)
    results = {}
    for unpack in ("floats", "ints", "words"):
        with _int4_unpack(unpack):
            results[unpack] = w4a16_linear(*args)
    assert torch.equal(results["floats"], results["ints"])  # both conversions are exact; same sums, same order
    # Words are exact too, but their sums run in another order: equal to rounding.
    assert _relative_error(results["words"], results["ints"]) < 1e-3
    assert _relative_error(results["words"], int4_linear_reference(*args)) < 1e-2


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("outlier", [None, 2000.0])
def test_int4_half2_products_match_the_integer_path(m, outlier):
    # KILN_INT4_GEMV_UNPACK=half2: exact nibbles, fp16 products and 16-position fp16 sums, so equal to rounding;
    # activations of 2,000 (a few per row) must not overflow them.
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    x, packed, scales, pre_quant_scale, bias = _int4_case(m, 4096, 4096, True, seed=13)
    if outlier is not None:
        x[:, ::997] = outlier
    args = (x, packed, scales, pre_quant_scale, bias)
    results = {}
    for unpack in ("ints", "half2"):
        with _int4_unpack(unpack):
            results[unpack] = w4a16_linear(*args)
    assert torch.isfinite(results["half2"]).all()
    assert _relative_error(results["half2"], results["ints"]) < 5e-3
    assert _relative_error(results["half2"], int4_linear_reference(*args)) < 1e-2


@pytest.mark.parametrize("unpack", ["words", "half2", "floats"])
@pytest.mark.parametrize("m", [1, 3])
def test_int4_gemv_of_a_k_shard_matches_reference(unpack, m):
    # A row-parallel rank's weight is a column slice of the packed bytes: read as words where they align,
    # as bytes where the shard starts mid-word.
    from kiln.kernels.triton_w4a16_gemv import w4a16_gemv

    x, packed, scales, pre_quant_scale, bias = _int4_case(m, 1024, 8192, True, seed=9)
    with _int4_unpack(unpack):
        for start in (0, 2048, 2050):
            # The reference takes the same scales; a shard starting mid-group just gets the first 16 groups.
            first_group = start // 128 if start % 128 == 0 else 0
            args = (x[:, :2048], packed[:, start : start + 2048], scales[:, first_group : first_group + 16],
                    pre_quant_scale[:2048], bias)  # fmt: skip
            got = w4a16_gemv(*args, group_size=128, block_k=128)
            assert _relative_error(got, int4_linear_reference(*args)) < 1e-2, start


def test_gemvs_replay_from_a_cuda_graph_with_new_inputs():
    # Decode runs these kernels from CUDA graphs: several launches per graph share the tile counters.
    from kiln.kernels.triton_fp8_gemv import fp8_gemv
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    fp8_args = list(_fp8_case(2, 4096, 4096, True, seed=11))
    int4_args = list(_int4_case(2, 4096, 4096, True, seed=12))
    x = torch.zeros_like(fp8_args[0])
    fp8_args[0] = int4_args[0] = x
    int4_row_args = [x[:1], *int4_args[1:]]  # one row: the word path and its own launch settings
    for _ in range(2):  # compile outside the capture
        fp8_gemv(*fp8_args), w4a16_linear(*int4_args), w4a16_linear(*int4_row_args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_out = fp8_gemv(*fp8_args)
        int4_out = w4a16_linear(*int4_args)
        int4_row = w4a16_linear(*int4_row_args)
        fp8_again = fp8_gemv(*fp8_args)
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen, device=DEVICE))
        graph.replay()
        assert _relative_error(fp8_out, fp8_linear_reference(*fp8_args)) < 1e-2
        assert _relative_error(int4_out, int4_linear_reference(*int4_args)) < 1e-2
        assert _relative_error(int4_row, int4_linear_reference(*int4_row_args)) < 1e-2
        assert torch.equal(fp8_again, fp8_out)
