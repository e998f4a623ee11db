"""Shared layers of decoder-only models: RMSNorm with fused residual add, SiLU-and-mul, Attention."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from kiln.kernels.attention import AttentionFunction, AttentionMetadata, reference_attention
from kiln.models.linear import LoadableModule
from kiln.models.parallel import reduce_add_rms_norm
from kiln.models.quantized_linear import fake_quant_fp8


@functools.cache
def _fused_ops_allowed() -> bool:
    """Triton is installed and KILN_DISABLE_FUSED_OPS=1 (for A/B benchmarks) is not set; read once."""
    return os.environ.get("KILN_DISABLE_FUSED_OPS") != "1" and importlib.util.find_spec("triton") is not None


def use_fused_ops(x: torch.Tensor) -> bool:
    """Whether the fused Triton kernels of `kernels.triton_fused_ops` take this activation (CUDA tensors)."""
    return x.is_cuda and _fused_ops_allowed()


def rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [num_tokens, hidden] -> (weight * norm(x + residual), x + residual); the CPU path."""
    if residual is not None:
        x = x + residual
    # Normalise in fp32 and scale in the activations' dtype, like the Llama reference.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * d] -> silu(gate) * up [num_tokens, d]; the CPU path."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class RMSNorm(LoadableModule):
    """RMSNorm that can first add the residual: norm(x, residual) -> (normed, x + residual)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.create_param("weight", hidden_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, partial: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [num_tokens, hidden]. Returns the normed sum and the sum (the new residual).

        partial: x is this tensor-parallel rank's partial sum (models.parallel.partial_sums_left_to_norms); the
        ranks' x are summed first, fused into one kernel with this norm where the GPUs allow it.
        """
        if partial:
            return reduce_add_rms_norm(x, residual, self.weight, self.eps, self.forward)
        if use_fused_ops(x) and (residual is None or residual.dtype == x.dtype):
            from kiln.kernels.triton_fused_ops import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        return rms_norm_reference(x, residual, self.weight, self.eps)


def silu_fused_into_next_product(gate_up: torch.Tensor) -> bool:
    """Whether the next linear layer may take [gate | up] itself (`forward(gate_up, gated=True)`).

    At one row (batch-1 decode) the down projection's GEMV computes silu(gate) * up as it loads its input,
    which saves the SiLU-and-mul launch. Off unless KILN_FUSE_SILU_INTO_GEMV=1: on an H200 it made the
    batch-1 TPOT slower (bf16 4.80 against 4.47 ms, fp8 3.23 against 3.09; docs/benchmarks.md round 8), as
    each of the GEMV's programs recomputes the SiLU of its input slice.
    """
    enabled = os.environ.get("KILN_FUSE_SILU_INTO_GEMV") == "1"
    return enabled and gate_up.dim() == 2 and gate_up.shape[0] == 1 and use_fused_ops(gate_up)


class SiluAndMul(torch.nn.Module):
    """silu(gate) * up for the fused [gate | up] projection output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, 2 * d] -> [num_tokens, d]."""
        if use_fused_ops(x):
            from kiln.kernels.triton_fused_ops import silu_and_mul

            return silu_and_mul(x)
        return silu_and_mul_reference(x)


class Attention(torch.nn.Module):
    """Attention of projected q/k/v over the flat batch, through the KV cache when one is set.

    The runtime assigns `k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads, head_dim])
    per layer after allocating KV memory; until then (None) each sequence attends to its own new tokens.
    A checkpoint calibrated for an FP8 KV cache adds `k_scale` / `v_scale` parameters (ModelOpt's
    per-tensor scales); the runtime copies them into `kv_cache_scales` when it allocates an FP8 cache.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # The attention backend's function (same contract as reference_attention); the runtime swaps
        # in a faster one (Triton) when the device and shapes allow it.
        self.attention_fn: AttentionFunction = reference_attention
        self.kv_cache_scales: tuple[float, float] = (1.0, 1.0)  # the cache holds k / k_scale, v / v_scale
        # Set by the runtime for the Triton backend, whose `rotary` argument takes unrotated q and k.
        self.backend_takes_rotary = False

    def calibrated_kv_scales(self) -> tuple[float, float] | None:
        """The checkpoint's FP8 KV-cache scales, or None when it has none."""
        k_scale, v_scale = getattr(self, "k_scale", None), getattr(self, "v_scale", None)
        if k_scale is None or v_scale is None:
            return None
        return float(k_scale), float(v_scale)

    def rotates_with_kv_store(self, q: torch.Tensor) -> bool:
        """Whether forward may take q and k unrotated, with `rotary` (off: KILN_FUSE_ROTARY_INTO_KV_STORE=0).

        The Triton backend then rotates them in the kernel that stores the keys: one launch a layer fewer and
        the same bits (on an H200 the fp8 batch-1 TPOT went from 3.09 to 3.04 ms; docs/benchmarks.md round 8).
        """
        enabled = os.environ.get("KILN_FUSE_ROTARY_INTO_KV_STORE", "1") != "0"
        return enabled and self.backend_takes_rotary and self.k_cache is not None and use_fused_ops(q)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_metadata: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q [num_tokens, num_heads * head_dim], k/v [num_tokens, num_kv_heads * head_dim] -> like q.

        rotary: (positions, cos table, sin table) when q and k are not rotated yet (rotates_with_kv_store).
        """
        num_tokens = q.shape[0]
        extra = {} if rotary is None else {"rotary": rotary}
        k_scale, v_scale = self.kv_cache_scales
        if self.k_cache is None and getattr(self, "k_scale", None) is not None:
            # No cache (evaluation): round K and V as the FP8 cache the checkpoint was calibrated for would.
            k, v = fake_quant_fp8(k, self.k_scale), fake_quant_fp8(v, self.v_scale)
        out = self.attention_fn(
            q.reshape(num_tokens, self.num_heads, self.head_dim),
            k.reshape(num_tokens, self.num_kv_heads, self.head_dim),
            v.reshape(num_tokens, self.num_kv_heads, self.head_dim),
            attn_metadata,
            scale=self.scale,
            sliding_window=self.sliding_window,
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            k_scale=k_scale,
            v_scale=v_scale,
            **extra,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
