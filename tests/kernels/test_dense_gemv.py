"""The 16-bit dense decode GEMV (split-K reduced in the same launch) against fp32 products, and its routing.

GPU tests; KILN_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs them in the Triton interpreter on small
shapes and fp16 only (the interpreter truncates bf16 casts), with small tiles and many programs so that
the tiles are still split along K. CPU CI has neither CUDA nor triton: the `gpu` tests skip there.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from kernel_configs import dense_gemv_config

from kiln.kernels.dense_gemm import dense_linear, dense_linear_reference

DEVICE = torch.device(os.environ.get("KILN_TEST_DEVICE", "cuda"))
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
BF16, FP16 = torch.bfloat16, torch.float16
DTYPES = [FP16] if INTERPRETER else [BF16, FP16]
# rtol, atol: one rounding of the output apart (the reference and the kernel add in different orders).
TOLERANCES = {BF16: (1e-2, 1e-2), FP16: (2e-3, 2e-3)}
# m, n, k, with_bias: N and K off the tile sizes, 1 to MAX_ROWS rows, Llama-3-8B shapes and TP=2 shards.
CASES = (
    [(1, 100, 200, False), (3, 70, 300, True), (16, 40, 96, True)]
    if INTERPRETER
    else [
        (1, 1000, 1536, True),
        (3, 1000, 1560, False),
        (1, 4096, 4096, False),
        (2, 3072, 4096, True),
        (4, 4096, 7168, False),
        (1, 14336, 4096, True),
        (16, 4096, 4096, True),
    ]
)


def _case(m: int, n: int, k: int, with_bias: bool, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(dtype)  # outputs ~ N(0, 1)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if with_bias else None
    return x, weight, bias


def _assert_matches_reference(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    expected = dense_linear_reference(x, weight, bias)
    assert out.shape == expected.shape and out.dtype == x.dtype
    rtol, atol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)


def test_dense_linear_on_cpu_is_f_linear():
    # CPU (and CI without triton): the routing never reaches the Triton module.
    x, weight = torch.randn(1, 64, dtype=BF16), torch.randn(32, 64, dtype=BF16)
    bias = torch.randn(32, dtype=BF16)
    assert torch.equal(dense_linear(x, weight, bias), F.linear(x, weight, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["dot", "fma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,with_bias", CASES)
def test_dense_gemv_matches_reference_and_repeats_bit_for_bit(variant, dtype, m, n, k, with_bias):
    from kiln.kernels.triton_dense_gemv import dense_gemv

    x, weight, bias = _case(m, n, k, with_bias, dtype, seed=m + n + k)
    with dense_gemv_config(variant=variant):
        first = dense_gemv(x, weight, bias)
        _assert_matches_reference(first, x, weight, bias)
        for _ in range(2):  # counters reset by the previous call; same partials, same order: same bits
            assert torch.equal(dense_gemv(x, weight, bias), first)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["dot", "fma"])
def test_dense_gemv_on_strided_activations(variant):
    from kiln.kernels.triton_dense_gemv import dense_gemv

    m, n, k = 3, 96, 160
    _, weight, bias = _case(m, n, k, True, FP16, seed=1)
    wide = torch.randn(m, 3 * k, device=DEVICE).to(FP16)
    row_strided = wide[:, k : 2 * k]  # a q/k/v-style view: row stride 3K
    transposed = torch.randn(k, m, device=DEVICE).to(FP16).T  # column-major: copied by dense_gemv
    with dense_gemv_config(variant=variant):
        for x in (row_strided, transposed):
            _assert_matches_reference(dense_gemv(x, weight, bias), x, weight, bias)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_dense_gemv_replays_from_a_cuda_graph_with_new_inputs():
    # Decode runs the GEMV from CUDA graphs: several launches per graph share the tile counters.
    from kiln.kernels.triton_dense_gemv import dense_gemv

    _, weight, bias = _case(1, 4096, 4096, True, BF16, seed=11)
    _, weight_2, _ = _case(1, 3072, 4096, False, BF16, seed=12)
    x = torch.zeros(1, 4096, dtype=BF16, device=DEVICE)
    for _ in range(2):  # compile outside the capture
        dense_gemv(x, weight, bias), dense_gemv(x, weight_2, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dense_gemv(x, weight, bias)
        out_2 = dense_gemv(x, weight_2, None)
        again = dense_gemv(x, weight, bias)
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    for _ in range(2):
        x.copy_(torch.randn(x.shape, generator=gen, device=DEVICE))
        graph.replay()
        _assert_matches_reference(out, x, weight, bias)
        _assert_matches_reference(out_2, x, weight_2, None)
        assert torch.equal(again, out)


@pytest.mark.gpu
def test_dense_linear_routes_decode_rows_to_the_gemv(monkeypatch):
    from kiln.kernels import dense_gemm, triton_dense_gemv

    if DEVICE.type != "cuda":  # the interpreter: let CPU tensors through the CUDA-only gate
        monkeypatch.setattr(dense_gemm, "gpu_kernels_available", lambda x, needs_fp8: True)
    calls = []
    real_gemv = triton_dense_gemv.dense_gemv

    def spy(x, weight, bias, gated=False):
        calls.append(x.shape[0])
        return real_gemv(x, weight, bias, gated)

    monkeypatch.setattr(triton_dense_gemv, "dense_gemv", spy)
    x, weight, bias = _case(5, 256, 512, True, DTYPES[0], seed=3)
    with dense_gemv_config(max_rows=4):
        for m in (1, 4, 5):  # 5 rows: above max_rows
            _assert_matches_reference(dense_linear(x[:m], weight, bias), x[:m], weight, bias)
        assert calls == [1, 4]
        monkeypatch.setenv("KILN_DISABLE_DENSE_GEMV", "1")  # read on every call
        assert torch.equal(dense_linear(x[:1], weight, bias), F.linear(x[:1], weight, bias))
        assert calls == [1, 4]
