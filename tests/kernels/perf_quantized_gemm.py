"""Timing of the quantized GEMMs (not collected by pytest): run it as a script on a GPU.

Llama-3-8B layer shapes (qkv 6144x4096, o_proj 4096x4096, gate_up 28672x4096, down 4096x14336): W4A16
(group 128) and FP8 W8A8 against a bf16 `torch.matmul`, at decode batch sizes (weight bandwidth) and at
a prefill of 4096 tokens (tensor-core throughput). Timed inside CUDA graphs, so Python launch overhead
does not hide the kernels' own speed. Columns marked "before" run the previous small-batch paths:
`_scaled_mm` after its own quantization kernel (fp8), integer-to-float nibble conversions (int4).

    python tests/kernels/perf_quantized_gemm.py          # the table
    python tests/kernels/perf_quantized_gemm.py --sweep [fp8] [int4] [int4rows]  # the decode GEMVs' launch settings

`int4rows` sweeps the INT4 GEMV at 2 and 4 rows (both counts' times added), the floats and half2 loops.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parents[1]))
from quantized_weights import random_int4  # noqa: E402

from kiln.kernels import triton_fp8_gemv, triton_w4a16_gemv  # noqa: E402
from kiln.kernels.quantized_gemm import fp8_linear, int4_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def bench(fn, rep: int = 200) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph, as the engine's decode steps run (no launch cost)."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def _weights(n: int, k: int, gen: torch.Generator):
    w16 = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, scales = random_int4(n, k, 128, gen, "cuda")
    w8 = (w16.float() / 1e-3).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w16, packed, scales, w8


def table() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    input_scale = torch.tensor(0.01, device="cuda")
    weight_scale = torch.tensor(1e-3, device="cuda")
    print(
        f"{'shape':<8} {'M':>5} {'bf16 us':>8} {'w4 us':>8} {'w4 before':>9} {'fp8 us':>8} {'fp8 before':>10} "
        f"{'w4 GB/s':>8} {'fp8 GB/s':>8}"
    )
    for name, (n, k) in SHAPES.items():
        w16, packed, scales, w8 = _weights(n, k, gen)
        channel_scale = torch.full((n,), 1e-3, device="cuda")
        for m in (1, 2, 4, 16, 256, 4096):
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
            # bench() calls each lambda before the loop moves on, so late binding is harmless here.
            t16 = bench(lambda: x @ w16.T)  # noqa: B023
            t4 = bench(lambda: int4_linear(x, packed, scales, None, None))  # noqa: B023
            t8 = bench(lambda: fp8_linear(x, w8, input_scale, channel_scale, None, weight_scale))  # noqa: B023
            t4_before = t8_before = float("nan")
            if m <= triton_w4a16_gemv.MAX_ROWS_GEMV:
                unpack = triton_w4a16_gemv.GEMV_CONFIG["unpack"]
                triton_w4a16_gemv.GEMV_CONFIG["unpack"] = "floats"  # bytes, the previous default
                t4_before = bench(lambda: int4_linear(x, packed, scales, None, None))  # noqa: B023
                triton_w4a16_gemv.GEMV_CONFIG["unpack"] = unpack
            if m <= triton_fp8_gemv.FP8_GEMV_CONFIG["max_rows"]:
                os.environ["KILN_DISABLE_FP8_GEMV"] = "1"
                t8_before = bench(lambda: fp8_linear(x, w8, input_scale, channel_scale, None, weight_scale))  # noqa: B023
                del os.environ["KILN_DISABLE_FP8_GEMV"]
            w4_bytes = packed.numel() + scales.numel() * 4 + x.numel() * 2 + m * n * 2
            w8_bytes = w8.numel() + x.numel() * 2 + m * n * 2
            print(
                f"{name:<8} {m:>5} {t16 * 1e3:>8.1f} {t4 * 1e3:>8.1f} {t4_before * 1e3:>9.1f} {t8 * 1e3:>8.1f} "
                f"{t8_before * 1e3:>10.1f} {w4_bytes / t4 / 1e6:>8.0f} {w8_bytes / t8 / 1e6:>8.0f}"
            )


def _sweep(label: str, config: dict, grid: dict, run_all) -> None:
    """Time every combination of `grid` (set into `config`); print the best per-layer total."""
    results = []
    for values in itertools.product(*grid.values()):
        config.update(dict(zip(grid, values, strict=True)))
        try:
            results.append((sum(bench(fn, rep=60) for fn in run_all()), dict(config)))
        except Exception as error:  # a setting that does not compile (shared memory) is skipped
            print(f"{label} {dict(config)}: {type(error).__name__}")
    results.sort(key=lambda item: item[0])
    for total, setting in results[:5]:
        print(f"{label} all four layers {total * 1e3:.1f} us: {setting}")
    config.update(results[0][1])


def sweep(kinds: list[str]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    input_scale = torch.tensor(0.01, device="cuda")
    layers = []
    for n, k in SHAPES.values():
        _, packed, scales, w8 = _weights(n, k, gen)
        x = torch.randn(4, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        layers.append((x[:1], packed, scales, w8, x))
    if "fp8" in kinds:
        fp8_grid = {
            "block_n": [32, 64, 128],
            "block_k": [128, 256, 512],
            "num_stages": [3, 4],
            "programs_per_sm": [2, 4, 8],
        }
        _sweep(
            "fp8 M=1",
            triton_fp8_gemv.FP8_GEMV_CONFIG,
            fp8_grid,
            lambda: [_fp8_call(x, w8, input_scale) for x, _, _, w8, _ in layers],
        )
    if "int4" in kinds:
        int4_grid = {  # num_stages left out: the one-row loops compile to the same SASS at 1 and 2 stages
            "block_n": [128, 256],
            "num_warps": [2, 4, 8],
            "programs_per_sm": [6, 8, 12, 16, 24],
            "unpack": [os.environ.get("KILN_INT4_GEMV_UNPACK", "half2")],  # words: round 7's sweep
        }
        _sweep(
            "int4 M=1",
            triton_w4a16_gemv.GEMV_CONFIG,
            int4_grid,
            lambda: [_int4_call(x, packed, scales) for x, packed, scales, _, _ in layers],
        )
    if "int4rows" in kinds:
        rows_grid = {
            "block_n": [128, 256],
            "num_warps": [4, 8],
            "programs_per_sm": [4, 8, 16],
            "unpack": ["floats", "half2"],
        }
        _sweep(
            "int4 M=2 + M=4",
            triton_w4a16_gemv.FEW_ROWS_GEMV_CONFIG,
            rows_grid,
            lambda: [_int4_call(x[:m], packed, scales) for _, packed, scales, _, x in layers for m in (2, 4)],
        )


def _fp8_call(x: torch.Tensor, w8: torch.Tensor, input_scale: torch.Tensor):
    channel_scale = torch.ones(w8.shape[0], device="cuda")
    return lambda: triton_fp8_gemv.fp8_gemv(x, w8, input_scale, channel_scale, None)


def _int4_call(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor):
    return lambda: int4_linear(x, packed, scales, None, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweep", nargs="*", choices=["fp8", "int4", "int4rows"], help="launch settings to sweep (default: all)"
    )
    args = parser.parse_args()
    if args.sweep is not None:
        sweep(args.sweep or ["fp8", "int4", "int4rows"])
    table()  # after a sweep, with the best settings it found
