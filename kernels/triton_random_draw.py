"""Triton kernel of the seeded exponential race (see `random_draw`): programs per (row, vocabulary chunk),
over probabilities or, in log space, over logits and 1 / temperature (no softmax pass).

One program per row walked a 128K vocabulary alone (~140 us a step at batch 1); the rows are now cut
into chunks raced in parallel, each keeping its best (ratio, token), and the best chunk wins. The
first-best rule of argmax holds: within a chunk the smallest token among equals, across chunks the
first chunk among equals (torch.argmax returns the first maximum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.random_draw import GOLDEN, MASK32, MIX1, MIX2, NOISE_BITS, U_MAX

BLOCK = 1024  # vocabulary entries per loop iteration
CHUNK = 8192  # vocabulary entries per program: 16 programs per row for a 128K vocabulary
# Module constants a jitted function reads must be constexpr.
_MASK32 = tl.constexpr(MASK32)
_GOLDEN = tl.constexpr(GOLDEN)
_MIX1 = tl.constexpr(MIX1)
_MIX2 = tl.constexpr(MIX2)
_SHIFT = tl.constexpr(32 - NOISE_BITS)
_INV_RANGE = tl.constexpr(1.0 / (1 << NOISE_BITS))
_U_MAX = tl.constexpr(U_MAX)


@triton.jit
def _mul32(x, constant: tl.constexpr):
    # (x * constant) mod 2^32 in int64, as random_draw._mul32 does it.
    low = x & 0xFFFF
    high = x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 13)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


@triton.jit
def _exponential_race_kernel(
    probs_ptr, keys_ptr, inv_temperature_ptr, value_ptr, index_ptr, vocab_size, row_stride, num_chunks,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, FROM_LOGITS: tl.constexpr,
):  # fmt: skip
    # FROM_LOGITS: probs_ptr holds logits, raced in log space (random_draw.logit_race_reference)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    key = tl.load(keys_ptr + row).to(tl.int64)
    if FROM_LOGITS:
        inv_temperature = tl.load(inv_temperature_ptr + row).to(tl.float32)
    lowest = float("-inf") if FROM_LOGITS else -1.0
    best_value = tl.full([BLOCK], lowest, tl.float32)  # per lane: the best ratio (or log ratio) and its token
    best_index = tl.zeros([BLOCK], dtype=tl.int64)
    chunk_start = chunk.to(tl.int64) * CHUNK
    for offset in range(0, CHUNK, BLOCK):
        index = chunk_start + offset + tl.arange(0, BLOCK).to(tl.int64)
        inside = index < vocab_size
        x = tl.load(probs_ptr + row.to(tl.int64) * row_stride + index, mask=inside, other=0.0).to(tl.float32)
        bits = _fmix32(key ^ _mul32(index, _GOLDEN))
        uniform = tl.minimum(((bits >> _SHIFT).to(tl.float32) + 0.5) * _INV_RANGE, _U_MAX)
        if FROM_LOGITS:
            ratio = x * inv_temperature - tl.log(-tl.log(uniform))
        else:
            ratio = x / -tl.log(uniform)
        ratio = tl.where(inside, ratio, lowest)
        better = ratio > best_value  # strict: a lane keeps its first best, as argmax keeps the first
        best_value = tl.where(better, ratio, best_value)
        best_index = tl.where(better, index, best_index)
    top = tl.max(best_value, axis=0)
    slot = row * num_chunks + chunk
    tl.store(value_ptr + slot, top)
    tl.store(index_ptr + slot, tl.min(tl.where(best_value == top, best_index, vocab_size), axis=0))


def _race(values: torch.Tensor, keys: torch.Tensor, inv_temperature: torch.Tensor | None) -> torch.Tensor:
    if values.stride(-1) != 1:
        values = values.contiguous()
    rows, vocab_size = values.shape
    if not rows:
        return torch.empty(0, dtype=torch.int64, device=values.device)
    num_chunks = triton.cdiv(vocab_size, CHUNK)
    best = torch.empty(rows, num_chunks, dtype=torch.float32, device=values.device)
    indices = torch.empty(rows, num_chunks, dtype=torch.int64, device=values.device)
    from_logits = inv_temperature is not None
    _exponential_race_kernel[(rows, num_chunks)](
        values, keys.contiguous(), inv_temperature.contiguous() if from_logits else keys, best, indices, vocab_size,
        values.stride(0), num_chunks, CHUNK=CHUNK, BLOCK=BLOCK, FROM_LOGITS=from_logits,
    )  # fmt: skip
    return indices.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)


def triton_exponential_race(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, vocab] probabilities (row stride free, last dim contiguous), [B] int64 keys -> [B] int64 tokens."""
    return _race(probs, keys, None)


def triton_logit_race(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, vocab] logits (-inf: filtered out), [B] fp32 1 / temperature, [B] int64 keys -> [B] int64 tokens."""
    return _race(logits, keys, inv_temperature)
