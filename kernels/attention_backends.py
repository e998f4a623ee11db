"""Attention backends and the choice between them, by capability.

`torch`: the PyTorch reference (any device; the oracle). `triton`: paged kernels for CUDA GPUs
(split-KV decode, chunked-prefill attention over the paged cache). `auto` takes Triton where it
supports the model and device, and says why when it does not.
"""

import logging
from dataclasses import dataclass

import torch

from kiln.core.errors import UserInputError
from kiln.kernels.attention import AttentionFunction, reference_attention

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention implementation."""

    name: str
    forward: AttentionFunction
    # forward also takes `rotary` (positions, cos, sin) with q and k unrotated (models.layers.Attention)
    takes_rotary: bool = False


def _triton_unsupported(
    head_dim: int, dtype: torch.dtype, block_size: int, device: torch.device, kv_cache_dtype: torch.dtype
) -> list[str]:
    if device.type != "cuda":
        return [f"device is {device.type}, Triton kernels need CUDA"]
    try:
        from kiln.kernels.triton_paged_attention import triton_attention_unsupported
    except ImportError as exc:  # no triton installed
        return [f"triton is not importable ({exc})"]
    return triton_attention_unsupported(head_dim, dtype, block_size, device, kv_cache_dtype)


def select_attention_backend(
    requested: str,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
    device: torch.device,
    kv_cache_dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """The backend to use: `requested` if it can run (else a clear error), or the best one for `auto`."""
    if requested not in BACKEND_NAMES:
        raise UserInputError(f"attention backend must be one of {', '.join(BACKEND_NAMES)}, got {requested!r}")
    if requested == "torch":
        return AttentionBackend("torch", reference_attention)
    reasons = _triton_unsupported(head_dim, dtype, block_size, device, kv_cache_dtype or dtype)
    if not reasons:
        from kiln.kernels.triton_paged_attention import triton_paged_attention

        return AttentionBackend("triton", triton_paged_attention, takes_rotary=True)
    if requested == "triton":
        raise UserInputError("the triton attention backend cannot run here: " + "; ".join(reasons))
    logger.info("attention backend: torch reference (%s)", "; ".join(reasons))
    return AttentionBackend("torch", reference_attention)
