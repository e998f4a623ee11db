"""Timing of the 16-bit dense decode GEMV against cuBLAS (not collected by pytest): run it as a script on a GPU.

Llama-3-8B's four layers (weight N x K) whole (TP=1) and as one rank's shard of two (TP=2), bf16, at 1,
2 and 4 rows: microseconds and weight GB/s of `F.linear` (cuBLAS) and of `dense_gemv` with
DENSE_GEMV_CONFIG, and the sum over the four layers (they run back to back in a decode step). Timed
inside CUDA graphs (no launch overhead), each layer over enough copies of its weight (MIN_STREAM_BYTES)
that it comes from HBM, not from the 60 MB L2, as in a model whose layers evict each other.

    python tests/kernels/perf_dense_gemv.py          # the table
    python tests/kernels/perf_dense_gemv.py --sweep  # launch settings at one row first, then the table
    python tests/kernels/perf_dense_gemv.py --sweep --per-layer  # each layer's best settings (per-shape gains)

The sweep times each setting on the four layers of each TP size run back to back (218 MB at TP=2, more
than the L2 holds), prints the five best of each and keeps the best at TP=2: 88 settings (40 compilations),
about 80 s on an H200 by estimate; `--budget-s` (100) stops the timing early so the script stays under 150 s.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import time

import torch
import torch.nn.functional as F
import triton.testing

from kiln.kernels import triton_dense_gemv

DEVICE = "cuda"
DTYPE = torch.bfloat16
SHAPES = {  # tensor-parallel ranks -> layer -> (N, K) of this rank's weight
    1: {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    2: {"qkv": (3072, 4096), "o_proj": (4096, 2048), "gate_up": (14336, 4096), "down": (4096, 7168)},
}
ROWS = (1, 2, 4)
MIN_STREAM_BYTES = 256 << 20  # weight bytes per timed call, about 4x the H200's L2
SWEEP_REP_MS = 20
TABLE_REP_MS = 30
# (block_n, block_k, num_warps) of the sweep. "dot": the warps' MMA rows (16 each) within block_n.
# "fma": 64 weights a thread (block_n * block_k / (32 * num_warps)), 16 or 32 KB a tile.
DOT_TILES = [(32, 256, 2), (32, 512, 2), (64, 128, 4), (64, 256, 4), (128, 64, 4), (128, 128, 4), (128, 128, 8)]
DOT_TILES += [(128, 256, 8), (256, 64, 8), (256, 128, 8)]
FMA_TILES = [(32, 256, 4), (64, 128, 4), (128, 64, 4), (32, 512, 8), (64, 256, 8), (128, 128, 8), (256, 64, 8)]
SHARED_MEMORY = 227 << 10  # per SM on Hopper, for the programs that share it


def bench(fn, rep: int) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph, as the engine's decode steps run."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def make_weights(gen: torch.Generator) -> dict[int, dict[str, list[torch.Tensor]]]:
    """TP size -> layer -> copies of its random weight, MIN_STREAM_BYTES or more together."""
    weights = {}
    for tp, layers in SHAPES.items():
        weights[tp] = {}
        for name, (n, k) in layers.items():
            copies = math.ceil(MIN_STREAM_BYTES / (n * k * DTYPE.itemsize))
            weights[tp][name] = [
                (torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(DTYPE) for _ in range(copies)
            ]
    torch.cuda.synchronize()
    return weights


def time_layer(op, x: torch.Tensor, copies: list[torch.Tensor]) -> float:
    """Microseconds of one product, averaged over the weight's copies (each read from HBM)."""
    return bench(lambda: [op(x, w, None) for w in copies], rep=TABLE_REP_MS) / len(copies) * 1e3


def table(weights: dict[int, dict[str, list[torch.Tensor]]], gen: torch.Generator) -> None:
    print(f"DENSE_GEMV_CONFIG = {triton_dense_gemv.DENSE_GEMV_CONFIG}")
    header = f"{'TP':>2} {'layer':<8} {'N x K':>12} {'M':>2} {'cuBLAS us':>9} {'gemv us':>8} "
    print(header + f"{'cuBLAS GB/s':>11} {'gemv GB/s':>9} {'speedup':>7}")
    for tp, layers in weights.items():
        totals = {m: [0.0, 0.0, 0] for m in ROWS}  # cuBLAS us, gemv us, weight bytes
        for name, copies in layers.items():
            n, k = copies[0].shape
            for m in ROWS:
                x = torch.randn(m, k, generator=gen, device=DEVICE).to(DTYPE)
                t_cublas = time_layer(F.linear, x, copies)
                t_gemv = time_layer(triton_dense_gemv.dense_gemv, x, copies)
                nbytes = n * k * DTYPE.itemsize
                totals[m][0] += t_cublas
                totals[m][1] += t_gemv
                totals[m][2] += nbytes
                _row(tp, name, f"{n}x{k}", m, t_cublas, t_gemv, nbytes)
        for m, (t_cublas, t_gemv, nbytes) in totals.items():
            _row(tp, "all four", "", m, t_cublas, t_gemv, nbytes)


def _row(tp: int, name: str, shape: str, m: int, t_cublas: float, t_gemv: float, nbytes: int) -> None:
    print(
        f"{tp:>2} {name:<8} {shape:>12} {m:>2} {t_cublas:>9.1f} {t_gemv:>8.1f} "
        f"{nbytes / t_cublas / 1e3:>11.0f} {nbytes / t_gemv / 1e3:>9.0f} {t_cublas / t_gemv:>6.2f}x"
    )


def sweep_grid() -> list[dict]:
    """The settings tried: each tile with the stages that fit, and 1 to 8 programs an SM where they fit."""
    grid = []
    for variant, tiles, stage_counts in (("dot", DOT_TILES, (3, 4, 6)), ("fma", FMA_TILES, (2, 3, 4))):
        for (block_n, block_k, num_warps), num_stages in itertools.product(tiles, stage_counts):
            # Shared memory of one program: "dot" keeps num_stages weight and activation tiles, the
            # pipelined loads of "fma" num_stages - 1 weight tiles (as Triton 3.6 allocates them).
            if variant == "dot":
                shared = num_stages * (block_n + 16) * block_k * 2
            else:
                shared = (num_stages - 1) * block_n * block_k * 2
            if shared > 200 << 10:
                continue
            for programs_per_sm in (1, 2, 4, 8):
                if programs_per_sm == 1 or programs_per_sm * shared <= SHARED_MEMORY:
                    grid.append(
                        {
                            "variant": variant,
                            "block_n": block_n,
                            "block_k": block_k,
                            "num_warps": num_warps,
                            "num_stages": num_stages,
                            "programs_per_sm": programs_per_sm,
                        }
                    )
    return grid


def _time_totals(op, runs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[int, float]:
    """TP size -> microseconds of op over its four layers back to back (x, weight pairs)."""
    return {
        tp: bench(lambda run=run: [op(x, w, None) for x, w in run], rep=SWEEP_REP_MS) * 1e3 for tp, run in runs.items()
    }


def _time_layers(
    op, weights: dict[int, dict[str, list[torch.Tensor]]], runs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
) -> dict[tuple[int, str], float]:
    """(TP size, layer) -> microseconds of op on that layer alone (--per-layer): one call on each copy of its
    weight in turn, so the weights come from HBM as in the model, not from L2 (a TP=2 o_proj is 17 MB)."""
    times = {}
    for tp, run in runs.items():
        for name, (x, _) in zip(SHAPES[tp], run):
            copies = weights[tp][name]
            times[tp, name] = bench(lambda x=x, copies=copies: [op(x, w, None) for w in copies], rep=SWEEP_REP_MS)
            times[tp, name] *= 1e3 / len(copies)
    return times


def _print_per_layer(results: list[tuple[dict, dict]], default: dict[tuple[int, str], float]) -> None:
    """Each layer's five best settings against the default's time: what per-shape settings could gain."""
    for key in sorted(default):
        ranked = sorted(results, key=lambda item: item[0][key])[:5]
        print(f"TP={key[0]} {key[1]}: default {default[key]:.2f} us; best five:")
        for times, setting in ranked:
            print(f"  {times[key]:6.2f} us {setting}")


def sweep(
    weights: dict[int, dict[str, list[torch.Tensor]]], gen: torch.Generator, budget_s: float, per_layer: bool = False
) -> None:
    """Time every setting of sweep_grid() at one row; keep the best by the TP=2 total in DENSE_GEMV_CONFIG.
    per_layer: time each layer alone instead, print each one's best settings, and keep the default."""
    runs = {}
    for tp, layers in weights.items():
        firsts = [copies[0] for copies in layers.values()]
        runs[tp] = [(torch.randn(1, w.shape[1], generator=gen, device=DEVICE).to(DTYPE), w) for w in firsts]
    cublas = _time_totals(F.linear, runs)
    config = triton_dense_gemv.DENSE_GEMV_CONFIG
    saved = dict(config)
    if per_layer:
        timed = functools.partial(_time_layers, weights=weights)
    else:
        timed = _time_totals
    default = timed(triton_dense_gemv.dense_gemv, runs=runs)
    grid = sweep_grid()
    results = []  # ({tp: us} or {(tp, layer): us}, setting)
    start = time.perf_counter()
    for setting in grid:
        if time.perf_counter() - start > budget_s:
            print(f"sweep budget of {budget_s:.0f} s spent: {len(results)} of {len(grid)} settings timed")
            break
        config.update(setting)
        try:
            results.append((timed(triton_dense_gemv.dense_gemv, runs=runs), dict(setting)))
        except Exception as error:  # a setting that does not compile or fit (OutOfResources) is skipped
            print(f"skipped {setting}: {type(error).__name__}")
    config.clear()
    config.update(saved)
    print(f"sweep: {len(results)} settings in {time.perf_counter() - start:.0f} s")
    if not results:
        return
    if per_layer:
        _print_per_layer(results, default)
        return
    for tp in runs:
        print(f"TP={tp}, four layers at 1 row: cuBLAS {cublas[tp]:.1f} us; best five:")
        for totals, setting in sorted(results, key=lambda item: item[0][tp])[:5]:
            print(f"  {totals[tp]:6.1f} us (TP={3 - tp}: {totals[3 - tp]:6.1f} us) {setting}")
    best_totals, best = min(results, key=lambda item: item[0][2])
    print(f"kept (best at TP=2): TP=1 {best_totals[1]:.1f} us, TP=2 {best_totals[2]:.1f} us: {best}")
    config.update(best)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="tune DENSE_GEMV_CONFIG at one row before the table")
    parser.add_argument("--budget-s", type=float, default=100.0, help="stop the sweep's timing after this long")
    parser.add_argument("--per-layer", action="store_true", help="with --sweep: each layer's best settings alone")
    args = parser.parse_args()
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    all_weights = make_weights(generator)
    if args.sweep:
        sweep(all_weights, generator, args.budget_s, args.per_layer)
    table(all_weights, generator)  # after a sweep, with the best settings it found
