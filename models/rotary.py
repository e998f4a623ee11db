"""Rotary position embedding (NeoX/Llama "rotate half" layout) with a precomputed cos/sin table."""

from __future__ import annotations

import torch
from torch import nn

from kiln.core.errors import ConfigError
from kiln.models.config import ModelConfig
from kiln.models.layers import use_fused_ops


def default_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """Unscaled inverse frequencies theta^(-2i/d): [head_dim // 2] fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (rope_theta**exponents)


def compute_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim // 2] fp32, cos/sin scaling factor) for the config's rope type."""
    if config.rope_scaling is None:
        return default_inv_freq(config.head_dim, config.rope_theta), 1.0
    # Scaled variants (linear, llama3, yarn) come from transformers itself, so they track its fixes.
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_scaling["rope_type"]
    init_fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if init_fn is None:
        raise ConfigError(f"rope_type {rope_type!r} is not known to this transformers version")
    try:
        # The init functions only read the rope fields below, which are the same for the whole family.
        hf_config = transformers.LlamaConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            rope_parameters={**config.rope_scaling, "rope_theta": config.rope_theta},
        )
        inv_freq, attention_scaling = init_fn(hf_config, torch.device("cpu"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"config.json: invalid rope parameters {config.rope_scaling}: {exc}") from exc
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k at given positions, from a [max_positions, head_dim/2] table."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        # Built on the CPU even under a meta-device context (the model is built on meta before
        # loading): the table is computed, never loaded; the loader moves it to the model's device.
        with torch.device("cpu"):
            inv_freq, attention_scaling = compute_inv_freq(config)
            positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
            freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim // 2]
        # The scaling factor multiplies cos and sin (yarn's attention factor), as in transformers.
        self.register_buffer("cos_cache", freqs.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [num_tokens, num_heads * head_dim] and k [num_tokens, num_kv_heads * head_dim].

        On CUDA the fused kernel rotates q and k in place (in the fused qkv tensor they are views of) and
        returns them; elsewhere the reference returns new tensors.
        """
        if use_fused_ops(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            from kiln.kernels.triton_fused_ops import rotary_embedding_

            rotary_embedding_(positions, q, k, self.cos_cache, self.sin_cache, self.head_dim)
            return q, k
        return rotary_reference(positions, q, k, self.cos_cache, self.sin_cache, self.head_dim)


def rotary_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q and k from the [max_positions, head_dim // 2] tables; the CPU path."""
    # [num_tokens, 1, head_dim // 2], in the activations' dtype like the reference implementation.
    cos = cos_cache[positions].to(q.dtype).unsqueeze(1)
    sin = sin_cache[positions].to(q.dtype).unsqueeze(1)
    return _rotate(q, cos, sin, head_dim), _rotate(k, cos, sin, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, per head, where rotate_half(x1, x2) = (-x2, x1)."""
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)  # [num_tokens, heads, head_dim]
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.view(shape)
