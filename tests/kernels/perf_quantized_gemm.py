"""Timing of the quantized GEMMs (not collected by pytest): run it as a script on a GPU.

Llama-3-8B layer shapes (o_proj 4096x4096, gate_up 28672x4096, down 4096x14336): W4A16 (group 128)
and FP8 W8A8 (`_scaled_mm`, with the Triton activation quantization) against a bf16 `torch.matmul`,
at decode batch sizes (weight bandwidth) and at a prefill of 4096 tokens (tensor-core throughput).
Timed inside CUDA graphs, so Python launch overhead does not hide the kernels' own speed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from test_quantized_gemm import random_int4  # noqa: E402

from kiln.kernels.quantized_gemm import fp8_linear, int4_linear  # noqa: E402

SHAPES = {"o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def bench(fn) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph, as the engine's decode steps run (no launch cost)."""
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'shape':<8} {'M':>5} {'bf16 us':>9} {'w4a16 us':>9} {'fp8 us':>9} {'w4 GB/s':>8} {'fp8 TFLOP/s':>11}")
    for name, (n, k) in SHAPES.items():
        w16 = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, scales = random_int4(n, k, 128, gen, "cuda")
        w8 = (w16.float() / 1e-3).clamp(-448, 448).to(torch.float8_e4m3fn)
        input_scale = torch.tensor(0.01, device="cuda")
        weight_scale = torch.tensor(1e-3, device="cuda")
        channel_scale = torch.full((n,), 1e-3, device="cuda")
        for m in (1, 16, 64, 256, 4096):
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
            # bench() calls each lambda before the loop moves on, so late binding is harmless here.
            t16 = bench(lambda: x @ w16.T)  # noqa: B023
            t4 = bench(lambda: int4_linear(x, packed, scales, None, None))  # noqa: B023
            t8 = bench(lambda: fp8_linear(x, w8, input_scale, channel_scale, None, weight_scale))  # noqa: B023
            w4_bytes = packed.numel() + scales.numel() * 4 + x.numel() * 2 + m * n * 2
            print(
                f"{name:<8} {m:>5} {t16 * 1e3:>9.1f} {t4 * 1e3:>9.1f} {t8 * 1e3:>9.1f} "
                f"{w4_bytes / t4 / 1e6:>8.0f} {2 * m * n * k / t8 / 1e9:>11.1f}"
            )


if __name__ == "__main__":
    main()
