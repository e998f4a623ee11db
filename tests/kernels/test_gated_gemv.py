"""Products that take the [gate | up] row and compute silu(gate) * up themselves (`gated=True`).

The down projection's dense and FP8 GEMVs at batch 1 save the SiLU-and-mul launch this way (INT4 and
larger batches run that kernel first). What can go wrong: the up half read from the wrong offset, the
activation rounded differently from the SiLU-and-mul kernel (so the fused path would change tokens), a
fallback path (more rows than a GEMV takes) that forgets the gate. Each case checks the gated product bit
for bit against the same product of the SiLU-and-mul kernel's output. GPU tests; KILN_TEST_DEVICE=cpu
with TRITON_INTERPRET=1 runs the dense and INT4 ones in the Triton interpreter on small shapes in fp16
(the interpreter gets FP8 conversions wrong).
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_configs import dense_gemv_config
from quantized_weights import random_int4

DEVICE = torch.device(os.environ.get("KILN_TEST_DEVICE", "cuda"))
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DTYPE = torch.float16 if INTERPRETER else torch.bfloat16
pytestmark = pytest.mark.gpu
not_in_interpreter = pytest.mark.skipif(INTERPRETER, reason="FP8 conversions are wrong in the Triton interpreter")


def _gate_up(m: int, k: int, seed: int) -> torch.Tensor:
    """[m, 2k] rows [gate | up], with gates on both sides of zero (where SiLU bends)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(m, 2 * k, generator=gen, device=DEVICE) * 2).to(DTYPE)


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    from kiln.kernels.triton_fused_ops import silu_and_mul

    return silu_and_mul(gate_up)


@pytest.mark.parametrize("variant", ["dot", "fma"])
def test_dense_gemv_takes_the_gate_up_row(variant):
    from kiln.kernels.dense_gemm import dense_linear
    from kiln.kernels.triton_dense_gemv import dense_gemv

    n, k = (96, 256) if INTERPRETER else (4096, 14336)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(DTYPE)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(DTYPE)
    with dense_gemv_config(variant=variant, max_rows=4):
        gate_up = _gate_up(1, k, seed=2)
        assert torch.equal(
            dense_gemv(gate_up, weight, bias, gated=True), dense_gemv(_silu_and_mul(gate_up), weight, bias)
        )
        rows = _gate_up(6, k, seed=3)  # more rows than the GEMV takes: cuBLAS after the SiLU-and-mul kernel
        assert torch.equal(
            dense_linear(rows, weight, bias, gated=True), dense_linear(_silu_and_mul(rows), weight, bias)
        )


@not_in_interpreter
def test_fp8_gemv_takes_the_gate_up_row():
    from kiln.kernels.quantized_gemm import fp8_linear

    n, k = 4096, 14336
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    input_scale = torch.tensor(0.02, device=DEVICE)
    channel_scale = torch.rand(n, generator=gen, device=DEVICE) * 1e-3 + 1e-4
    for m in (1, 3):  # one row: the FP8 GEMV; three: quantization kernel and _scaled_mm after SiLU-and-mul
        gate_up = _gate_up(m, k, seed=5 + m)
        args = (weight, input_scale, channel_scale, None, None)
        assert torch.equal(fp8_linear(gate_up, *args, gated=True), fp8_linear(_silu_and_mul(gate_up), *args)), m


def test_int4_product_of_the_gate_up_row_runs_the_silu_first():
    # The INT4 GEMV is bound by instruction issue: the gate is applied by the SiLU-and-mul kernel before it.
    from kiln.kernels.quantized_gemm import int4_linear

    n, k = (128, 512) if INTERPRETER else (4096, 14336)
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    packed, scales = random_int4(n, k, 128, gen, DEVICE)
    pre_quant_scale = (torch.rand(k, generator=gen, device=DEVICE) + 0.5).to(DTYPE)
    for m in (1, 8):
        gate_up = _gate_up(m, k, seed=9 + m)
        args = (packed, scales, pre_quant_scale, None)
        assert torch.equal(int4_linear(gate_up, *args, gated=True), int4_linear(_silu_and_mul(gate_up), *args)), m


@pytest.mark.parametrize("kind", ["dense", pytest.param("fp8", marks=not_in_interpreter)])
def test_activation_tile_built_row_by_row_gives_the_same_bits(kind, monkeypatch):
    # KILN_GEMV_TILE_BY_ROWS=1 (an A/B switch): the tensor-core GEMVs' activation tile from its real rows.
    from kiln.kernels.triton_dense_gemv import dense_gemv
    from kiln.kernels.triton_fp8_gemv import fp8_gemv

    n, k = (96, 256) if INTERPRETER else (4096, 4096)
    gen = torch.Generator(device=DEVICE).manual_seed(12)
    if kind == "dense":
        weight = (torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(DTYPE)
        product = lambda x: dense_gemv(x, weight, None)  # noqa: E731
    else:
        weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = torch.tensor(0.02, device=DEVICE), torch.full((n,), 1e-3, device=DEVICE)
        product = lambda x: fp8_gemv(x, weight, *scales, None)  # noqa: E731
    with dense_gemv_config(max_rows=4):
        for m in (1, 3) if kind == "dense" else (1,):
            x = torch.randn(m, k, generator=gen, device=DEVICE).to(DTYPE)
            monkeypatch.setenv("KILN_GEMV_TILE_BY_ROWS", "0")
            masked = product(x)
            monkeypatch.setenv("KILN_GEMV_TILE_BY_ROWS", "1")
            assert torch.equal(product(x), masked), m
