"""Single-request generation: prefill once, then decode token by token through a paged KV cache.

This is the path `kiln run` uses until the batched engine (scheduler + KV manager) lands: one
sequence, whose blocks are simply 0..n-1 of a cache sized for prompt + max_tokens.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.core.errors import UserInputError
from kiln.kernels.attention import AttentionMetadata
from kiln.models.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class GenerationOptions:
    """How to sample one completion."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UserInputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise UserInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """The generated token ids and why generation ended ("stop": a stop token, "length": max_tokens)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


class SingleSequenceGenerator:
    """Runs one prompt at a time through a model with a per-layer paged KV cache."""

    def __init__(self, model: nn.Module, config: ModelConfig, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.attention_layers = [module for module in model.modules() if hasattr(module, "k_cache")]

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], options: GenerationOptions, on_token: Callable[[int], None] | None = None
    ) -> GenerationResult:
        """Generate up to options.max_tokens tokens after prompt_ids; on_token sees each one as it comes."""
        if not prompt_ids:
            raise UserInputError("the prompt is empty; give at least one token")
        max_len = len(prompt_ids) + options.max_tokens
        if max_len > self.config.max_position_embeddings:
            raise UserInputError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({options.max_tokens}) exceeds the model's "
                f"context of {self.config.max_position_embeddings} tokens; shorten one of them"
            )
        generator = torch.Generator(device=self.device)
        generator.manual_seed(options.seed if options.seed is not None else torch.seed())
        block_table = list(range(math.ceil(max_len / self.block_size)))
        self._allocate_cache(len(block_table))
        try:
            return self._loop(prompt_ids, options, block_table, generator, on_token)
        finally:
            self._release_cache()

    def _loop(
        self,
        prompt_ids: list[int],
        options: GenerationOptions,
        block_table: list[int],
        generator: torch.Generator,
        on_token: Callable[[int], None] | None,
    ) -> GenerationResult:
        result = GenerationResult()
        new_ids, start = list(prompt_ids), 0  # the first step is the whole prompt (prefill)
        while True:
            logits = self._step(new_ids, start, block_table)  # [vocab] for the last new token
            token = sample(logits, options.temperature, options.top_p, generator)
            result.token_ids.append(token)
            if on_token is not None:
                on_token(token)
            if token in options.stop_token_ids:
                result.finish_reason = "stop"
                return result
            if len(result.token_ids) >= options.max_tokens:
                return result
            start += len(new_ids)
            new_ids = [token]

    def _step(self, new_ids: list[int], start: int, block_table: list[int]) -> torch.Tensor:
        positions = list(range(start, start + len(new_ids)))
        # Blocks are 0..n-1 in order, so a position's slot is the position itself.
        metadata = AttentionMetadata.build(
            query_lens=[len(new_ids)],
            seq_lens=[start + len(new_ids)],
            device=self.device,
            slot_mapping=positions,
            block_tables=[block_table],
        )
        input_ids = torch.tensor(new_ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, torch.tensor(positions, dtype=torch.long, device=self.device), metadata)
        return self.model.compute_logits(hidden[-1:])[0].float()

    def _allocate_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.config.num_kv_heads, self.config.head_dim)
        for layer in self.attention_layers:
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _release_cache(self) -> None:
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = None


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Pick the next token from [vocab] logits: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, sorted_ids, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
