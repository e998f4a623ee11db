"""Timing of the Triton paged-attention kernels (not collected by pytest): run it as a script on a GPU.

Decode: 64 sequences x 2048 context, Llama-3-8B heads (32 q / 8 kv, head_dim 128), bf16, block 16,
against the PyTorch reference and torch SDPA on contiguous K/V (a bandwidth yardstick); then 256 x 1024
with an FP8 cache and with a bf16 one. `--sweep [fp8] [--seqs N] [--context L]`: the decode kernel's tile
settings (SWEEP_TILES: keys, warps, stages, fewest query rows) at N sequences x L keys (256 x 1024 by
default; 1024 x 160 is a 128/128 step's shape), for each cache type (or the FP8 cache only). `--batch1-splits`:
one sequence's decode by split count (1 to 32) at contexts of 256 to 4,096 keys.
Prefill: 4 prompts x 2048 tokens against causal SDPA on contiguous tensors.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from test_triton_attention import make_case  # noqa: E402

from kiln.kernels.attention import reference_attention  # noqa: E402
from kiln.kernels.triton_decode_attention import DecodeTile, decode_attention  # noqa: E402
from kiln.kernels.triton_paged_attention import triton_paged_attention  # noqa: E402

HEADS = (32, 8, 128)


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def row(name: str, ms: float, num_bytes: float | None = None, flops: float | None = None) -> None:
    extra = ""
    if num_bytes is not None:
        extra += f"  {num_bytes / ms / 1e6:8.0f} GB/s"
    if flops is not None:
        extra += f"  {flops / ms / 1e9:8.1f} TFLOP/s"
    print(f"{name:<48} {ms * 1000:10.1f} us{extra}")


def decode_call(case, num_splits: int, **options):
    """The decode kernel alone over a case's cache (Llama-3-8B heads), as a call to time; `options` go to
    `decode_attention` (tile, heads_fastest)."""
    return functools.partial(
        decode_attention, case.q, case.k_cache, case.v_cache, case.metadata.block_tables, case.metadata.seq_lens,
        torch.empty_like(case.q), scale=1 / math.sqrt(HEADS[2]), sliding_window=None, num_splits=num_splits,
        **options,
    )  # fmt: skip


def decode_table(num_seqs: int = 64, context_len: int = 2048, cache_dtype: torch.dtype = torch.bfloat16) -> None:
    num_heads, num_kv_heads, head_dim = HEADS
    case = make_case(
        [1] * num_seqs, [context_len] * num_seqs, HEADS, torch.bfloat16, 16, seed=0, cache_dtype=cache_dtype
    )
    scale = 1 / math.sqrt(head_dim)
    kv_bytes = 2 * num_seqs * context_len * num_kv_heads * head_dim * cache_dtype.itemsize  # K and V
    print(f"decode: {num_seqs} seqs x {context_len} context, heads {HEADS}, bf16 queries, {cache_dtype} cache")
    md = case.metadata

    def paged(num_splits=None):
        return lambda: triton_paged_attention(
            case.q, case.k, case.v, md, scale=scale, sliding_window=None,
            k_cache=case.k_cache, v_cache=case.v_cache, num_splits=num_splits,
        )  # fmt: skip

    row("triton_paged_attention (store + decode, auto)", bench(paged()), kv_bytes)
    for splits in (1, 2, 4, 8):
        row(f"  decode kernel only, num_splits={splits}", bench(decode_call(case, splits)), kv_bytes)
    k_cache, v_cache = case.k_cache.contiguous(), case.v_cache.contiguous()
    ref = lambda: reference_attention(  # noqa: E731
        case.q, case.k, case.v, md, scale=scale, sliding_window=None, k_cache=k_cache, v_cache=v_cache
    )
    if cache_dtype != torch.bfloat16:
        return  # the yardsticks below are bf16
    row("reference_attention (PyTorch loop, fp32)", bench(ref), kv_bytes)
    q = case.q.contiguous().view(num_seqs, num_heads, 1, head_dim)
    k = torch.randn(num_seqs, num_kv_heads, context_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
    row("torch SDPA, contiguous K/V, enable_gqa", bench(sdpa), kv_bytes)
    k_full, v_full = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    sdpa_mha = lambda: F.scaled_dot_product_attention(q, k_full, v_full, scale=scale)  # noqa: E731
    row("torch SDPA, contiguous K/V repeated to 32 heads", bench(sdpa_mha), 4 * kv_bytes)


# The sweep's candidates (keys, warps, stages, fewest query rows) per cache element size: one warp and 4-row
# products against round 9's defaults (FP8: 32, 2, 2, 16; bf16: 64, 4, 2, 16).
SWEEP_TILES = {
    1: [DecodeTile(*t) for t in [
        (16, 1, 2, 4), (16, 1, 3, 4), (32, 1, 2, 4), (32, 1, 3, 4), (32, 1, 2, 16), (64, 1, 2, 4), (16, 2, 2, 4),
        (32, 2, 2, 4), (32, 2, 2, 16), (32, 2, 3, 4), (64, 2, 2, 4), (64, 2, 3, 4), (64, 4, 2, 4), (64, 4, 3, 4),
        (128, 4, 3, 4), (128, 4, 2, 16)]],
    2: [DecodeTile(*t) for t in [
        (64, 4, 2, 16), (64, 4, 2, 4), (32, 1, 2, 4), (32, 2, 2, 4), (64, 2, 2, 4), (64, 4, 3, 4), (32, 4, 2, 4),
        (128, 4, 2, 4)]],
}  # fmt: skip


def tile_sweep(cache_dtypes: tuple[torch.dtype, ...], num_seqs: int = 256, context_len: int = 1024) -> None:
    for cache_dtype in cache_dtypes:
        print(f"decode tile sweep: {num_seqs} seqs x {context_len} context, {cache_dtype} cache, 1 split")
        case = make_case(
            [1] * num_seqs, [context_len] * num_seqs, HEADS, torch.bfloat16, 16, seed=0, cache_dtype=cache_dtype
        )
        kv_bytes = 2 * num_seqs * context_len * HEADS[1] * HEADS[2] * cache_dtype.itemsize
        for tile in SWEEP_TILES[cache_dtype.itemsize]:
            block_n, num_warps, num_stages, min_rows = tile.block_n, tile.num_warps, tile.num_stages, tile.min_rows
            name = f"  block_n={block_n} warps={num_warps} stages={num_stages} rows={min_rows}"
            try:
                row(name, bench(decode_call(case, 1, tile=tile)), kv_bytes)
            except Exception as error:  # noqa: BLE001 - a setting that does not fit (shared memory) is skipped
                print(f"{name}: {type(error).__name__}")


def prefill_table(num_seqs: int = 4, prompt_len: int = 2048) -> None:
    num_heads, num_kv_heads, head_dim = HEADS
    lens = [prompt_len] * num_seqs
    case = make_case(lens, lens, HEADS, torch.bfloat16, 16, seed=0)
    scale = 1 / math.sqrt(head_dim)
    flops = 2 * 2 * num_seqs * num_heads * head_dim * prompt_len * prompt_len / 2  # causal half
    print(f"prefill: {num_seqs} prompts x {prompt_len} tokens, heads {HEADS}, bf16, block 16")
    paged = lambda: triton_paged_attention(  # noqa: E731
        case.q, case.k, case.v, case.metadata, scale=scale, sliding_window=None,
        k_cache=case.k_cache, v_cache=case.v_cache,
    )  # fmt: skip
    row("triton_paged_attention (store + prefill)", bench(paged), flops=flops)
    q = torch.randn(num_seqs, num_heads, prompt_len, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(num_seqs, num_heads, prompt_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # noqa: E731
    row("torch SDPA causal, contiguous, 32 kv heads", bench(sdpa), flops=flops)


def batch1_splits_table() -> None:
    """Batch-1 decode by split count: µs a call, replayed 10 times from a CUDA graph (a decode graph fixes its
    split count for the longest context; shorter contexts leave most splits empty)."""
    for context_len in (256, 384, 1024, 4096):
        case = make_case([1], [context_len], HEADS, torch.bfloat16, 16, seed=0)
        times = []
        for splits in (1, 2, 4, 8, 16, 32):
            call = decode_call(case, splits)
            ms = triton.testing.do_bench_cudagraph(lambda: [call() for _ in range(10)], rep=100)  # noqa: B023
            times.append(f"S={splits} {ms * 100:.2f} us")
        print(f"batch 1, context {context_len}: " + "  ".join(times), flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    if "--sweep" in sys.argv:  # `--sweep fp8`: the FP8 cache only
        shape = {flag: int(sys.argv[sys.argv.index(flag) + 1]) for flag in ("--seqs", "--context") if flag in sys.argv}
        tile_sweep(
            (torch.float8_e4m3fn,) if "fp8" in sys.argv else (torch.float8_e4m3fn, torch.bfloat16),
            shape.get("--seqs", 256),
            shape.get("--context", 1024),
        )
        sys.exit()
    if "--batch1-splits" in sys.argv:
        batch1_splits_table()
        sys.exit()
    decode_table()
    decode_table(256, 1024, torch.float8_e4m3fn)  # a 1000/1000 step's shape, FP8 cache
    decode_table(256, 1024)
    prefill_table()
