"""Programmatic dependent launch (kernels/pdl.py) on a GPU: the decode kernels chained as a decode step chains
them give the same bits launched with PDL as without, eagerly and replayed from a CUDA graph.

What can go wrong: a kernel that reads its input, or writes its output, before the previous kernel is done
with that memory (a race: wrong values only now and then, so the chain runs many times), or shared split-K
counters touched by two GEMVs at once.
"""

from __future__ import annotations

import pytest
import torch
from quantized_weights import random_int4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="PDL needs Hopper"
    ),
]
BF16 = torch.bfloat16
HIDDEN, INTERMEDIATE, LAYERS = 4096, 14336, 6


def _weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    fp8 = lambda n, k: (torch.randn(n, k, generator=gen, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)  # noqa: E731
    layers = []
    for _ in range(LAYERS):
        packed, scales = random_int4(HIDDEN, INTERMEDIATE, 128, gen, "cuda")
        layers.append({
            "norm": torch.rand(HIDDEN, generator=gen, device="cuda").to(BF16) + 0.5,
            "gate_up": fp8(2 * INTERMEDIATE, HIDDEN),
            "input_scale": torch.tensor(0.02, device="cuda"),
            "gate_up_scale": torch.full((2 * INTERMEDIATE,), 2e-4, device="cuda"),
            "down_packed": packed,
            "down_scales": scales,
        })  # fmt: skip
    return layers


def _chain(x: torch.Tensor, layers: list[dict]) -> torch.Tensor:
    """Norm -> FP8 GEMV -> SiLU-and-mul -> INT4 GEMV per layer, with the residual stream carried along.

    Captured into a CUDA graph too, so it makes no tensor from host values (the input scale is a layer weight).
    """
    from kiln.kernels.triton_fp8_gemv import fp8_gemv
    from kiln.kernels.triton_fused_ops import fused_add_rms_norm, silu_and_mul
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    hidden, residual = x, None
    for layer in layers:
        normed, residual = fused_add_rms_norm(hidden, residual, layer["norm"], 1e-5)
        gate_up = fp8_gemv(normed, layer["gate_up"], layer["input_scale"], layer["gate_up_scale"], None)
        hidden = w4a16_linear(silu_and_mul(gate_up), layer["down_packed"], layer["down_scales"], None, None)
    return torch.cat([hidden, residual])


def test_a_chain_of_decode_kernels_gives_the_same_bits_with_and_without_pdl(monkeypatch) -> None:
    layers = _weights()
    inputs = [torch.randn(1, HIDDEN, device="cuda").to(BF16) for _ in range(4)]
    monkeypatch.setenv("KILN_DISABLE_PDL", "1")
    expected = [_chain(x, layers) for x in inputs]
    assert all(out.isfinite().all() for out in expected)
    monkeypatch.delenv("KILN_DISABLE_PDL")
    for x, want in zip(inputs, expected):
        for _ in range(20):
            assert torch.equal(_chain(x, layers), want)
    # Replayed from a graph captured with PDL launches (programmatic edges between the kernels).
    static_x = inputs[0].clone()
    _chain(static_x, layers)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _chain(static_x, layers)
    for _ in range(10):
        for x, want in zip(inputs, expected):
            static_x.copy_(x)
            graph.replay()
            assert torch.equal(static_out, want)
