"""Seeded, batched token draws: the exponential race with counter-based noise, and its PyTorch reference.

Each sampling row draws token argmax(p_i / q_i) with q_i ~ Exp(1): token i wins with probability p_i.
The noise is a hash of (row key, token index), and the row key a hash of (request seed, output position),
so a request's draw depends only on its own seed and how many tokens it has produced: not on its batch
neighbours, not on a stateful generator. That replaces one `exponential_` launch per row and step with
one kernel for the whole batch. The integer mixing works on 32-bit words held in int64 (products are
split so nothing overflows); the Triton kernel does the same arithmetic, so both get the same noise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # odd: index * GOLDEN mod 2^32 is a bijection, so every token gets different noise
MIX1, MIX2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3's finaliser constants
NOISE_BITS = 24  # uniform u = (bits + 0.5) / 2^24, never 0; capped at U_MAX below
# The top value, (2^24 - 0.5) / 2^24, rounds to 1.0 in fp32: its E = -log u was 0, so its token (one of 2^24
# noise values) lost every race instead of nearly always winning. It takes the largest fp32 below 1 instead.
U_MAX = 1.0 - 2.0**-24


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for int64 x in [0, 2^32), split so that no product overflows int64."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & MASK32


def _fmix32(x):
    """murmur3's 32-bit finaliser: a bijection that spreads every input bit over the output.

    x: an int64 tensor of 32-bit words (products go through _mul32), or a numpy uint32 array (wraps natively).
    """
    multiply = (lambda v, c: v * np.uint32(c)) if isinstance(x, np.ndarray) else _mul32
    x = x ^ (x >> 16)
    x = multiply(x, MIX1)
    x = x ^ (x >> 13)
    x = multiply(x, MIX2)
    return x ^ (x >> 16)


def row_keys(seeds: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """[B] int64 noise keys (< 2^32) of the rows' draws: a hash of each request's seed and output position."""
    seeds_u64 = np.asarray(seeds, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps mod 2^32, which is the point
        word = _fmix32(
            np.asarray(positions, dtype=np.uint64).astype(np.uint32) * np.uint32(GOLDEN) + np.uint32(0x7F4A7C15)
        )
        word = _fmix32((seeds_u64 >> np.uint64(32)).astype(np.uint32) ^ word)
        word = _fmix32((seeds_u64 & np.uint64(MASK32)).astype(np.uint32) ^ word)
    return word.astype(np.int64)


def _uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, vocab] fp32 uniforms in (0, 1): the hash of each row key and token index."""
    index = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)
    bits = _fmix32(keys.to(torch.int64)[:, None] ^ _mul32(index, GOLDEN)[None, :])  # [B, vocab]
    return (((bits >> (32 - NOISE_BITS)).float() + 0.5) * (1.0 / (1 << NOISE_BITS))).clamp(max=U_MAX)


def exponential_race_reference(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, vocab] probabilities and [B] int64 row keys -> [B] int64 tokens, drawn in PyTorch."""
    return (probs.float() / -torch.log(_uniform_noise(keys.to(probs.device), probs.shape[1]))).argmax(dim=-1)


def logit_race_reference(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The same race in log space, from [B, vocab] logits (-inf: filtered out) and [B] 1 / temperature.

    p_i / E_i is largest where log p_i - log E_i is: logits_i / T - log(-log u_i), the softmax's normaliser
    being the same for every token of a row. So no softmax is computed, and the draw follows the same
    distribution with the same noise: it picks the probabilities' token except where two candidates are
    within float rounding of each other.
    """
    noise = torch.log(-torch.log(_uniform_noise(keys.to(logits.device), logits.shape[1])))
    return (logits.float() * inv_temperature.float()[:, None] - noise).argmax(dim=-1)


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def exponential_race(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The draw on the probabilities' device: one Triton kernel on CUDA, the reference elsewhere."""
    if _use_triton(probs.device):
        from kiln.kernels.triton_random_draw import triton_exponential_race

        return triton_exponential_race(probs, keys)
    return exponential_race_reference(probs, keys)


def logit_race(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The draw from logits and 1 / temperature (see `logit_race_reference`): one pass over the logits."""
    if _use_triton(logits.device):
        from kiln.kernels.triton_random_draw import triton_logit_race

        return triton_logit_race(logits, inv_temperature, keys)
    return logit_race_reference(logits, inv_temperature, keys)
