"""Decode attention's grid order and the paged cache's read ceiling (not collected by pytest): run on a GPU.

`python tests/kernels/perf_decode_grid.py [--seqs N] [--context L]` times, for an FP8 and a bf16 cache
(Llama-3-8B heads, block 16, shuffled blocks):
- a read probe: a kernel that only reads every key and value of each (sequence, KV head) through the block
  table, the way the decode kernel does, and XORs the words together. Its GB/s is what the access pattern
  allows; the decode kernel's distance from it is its own loop's cost;
- the decode kernel itself (DECODE_TILES, one split and the automatic split count),
each with the sequences fastest in the grid and with a sequence's KV heads fastest (`KILN_DECODE_GRID`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from perf_triton_attention import HEADS, bench, decode_call, row  # noqa: E402
from test_triton_attention import make_case  # noqa: E402

from kiln.kernels.triton_decode_attention import decode_num_splits  # noqa: E402


@triton.jit
def _read_probe_kernel(
    k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, stride_b, stride_s, stride_h, stride_bt,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):  # fmt: skip
    """XOR of every int32 word of one (sequence, KV head)'s keys and values (a read with ~no arithmetic)."""
    if HEADS_FASTEST:
        kv_head, seq = tl.program_id(0), tl.program_id(1)
    else:
        seq, kv_head = tl.program_id(0), tl.program_id(1)
    context_len = tl.load(seq_lens_ptr + seq)
    w = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_N, WORDS], tl.int32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n in range(0, context_len, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        valid = pos < context_len
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = block[:, None] * stride_b + (pos % BLOCK_SIZE)[:, None] * stride_s + kv_head * stride_h + w[None, :]
        acc ^= tl.load(k_ptr + off, mask=valid[:, None], other=0) ^ tl.load(v_ptr + off, mask=valid[:, None], other=0)
    tl.store(out_ptr + seq * tl.num_programs(0 if HEADS_FASTEST else 1) + kv_head, tl.xor_sum(tl.xor_sum(acc, 1), 0))


def read_probe(case, heads_fastest: bool, block_n: int, num_warps: int, num_stages: int) -> None:
    """One probe launch over the case's caches (viewed as int32 words)."""
    k_words, v_words = case.k_cache.view(torch.int32), case.v_cache.view(torch.int32)
    num_seqs, num_kv_heads = case.metadata.block_tables.shape[0], k_words.shape[2]
    out = torch.empty(num_seqs * num_kv_heads, dtype=torch.int32, device=k_words.device)
    grid = (num_kv_heads, num_seqs) if heads_fastest else (num_seqs, num_kv_heads)
    _read_probe_kernel[grid](
        k_words, v_words, case.metadata.block_tables, case.metadata.seq_lens, out, *k_words.stride()[:3],
        case.metadata.block_tables.stride(0), BLOCK_SIZE=k_words.shape[1], BLOCK_N=block_n, WORDS=k_words.shape[3],
        HEADS_FASTEST=heads_fastest, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def grid_table(num_seqs: int, context_len: int) -> None:
    for cache_dtype in (torch.float8_e4m3fn, torch.bfloat16):
        print(f"{num_seqs} seqs x {context_len} keys, {cache_dtype} cache")
        case = make_case(
            [1] * num_seqs, [context_len] * num_seqs, HEADS, torch.bfloat16, 16, seed=0, cache_dtype=cache_dtype
        )
        kv_bytes = 2 * num_seqs * context_len * HEADS[1] * HEADS[2] * cache_dtype.itemsize
        auto_splits = decode_num_splits(context_len, num_seqs, HEADS[1], case.q.device)
        for heads_fastest in (False, True):
            order = "heads fastest" if heads_fastest else "seqs fastest"
            for block_n, num_warps, num_stages in ((32, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 3)):
                probe = functools.partial(read_probe, case, heads_fastest, block_n, num_warps, num_stages)
                row(f"  probe, {order}, {block_n} keys {num_warps} warps {num_stages} stages", bench(probe), kv_bytes)
            for splits in sorted({1, auto_splits}):
                decode = decode_call(case, splits, heads_fastest=heads_fastest)
                row(f"  decode kernel, {order}, {splits} split(s)", bench(decode), kv_bytes)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    shape = {flag: int(sys.argv[sys.argv.index(flag) + 1]) for flag in ("--seqs", "--context") if flag in sys.argv}
    grid_table(shape.get("--seqs", 256), shape.get("--context", 1024))
