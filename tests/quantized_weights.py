"""Random quantized weights in ModelOpt's layouts, for the kernel tests and timing scripts."""

from __future__ import annotations

import torch


def random_int4(n: int, k: int, group_size: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random int4 weight in ModelOpt's layout: packed uint8 [n / 2, k] and fp32 scales [n, k / group]."""
    q = torch.randint(-8, 8, (n, k), generator=gen, device=device, dtype=torch.int16)
    nibbles = (q & 0xF).to(torch.uint8).view(n // 2, 2, k)
    packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
    scales = torch.rand(n, k // group_size, generator=gen, device=device) * 0.02 + 0.001
    return packed.contiguous(), scales
