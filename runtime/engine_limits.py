"""The sizes an engine runs with: resolved once from its options, the model and the device's memory."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.core.errors import UserInputError
from kiln.models.config import ModelConfig
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.kv_sizing import KVCachePlan


@dataclass(frozen=True)
class EngineLimits:
    """The resolved sizes the engine runs with (printed once, recorded by callers)."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    block_size: int
    num_kv_blocks: int
    attention_backend: str
    device: str
    dtype: str
    kv_cache_dtype: str
    cuda_graph_batch_sizes: tuple[int, ...] = ()  # decode batch sizes replayed from CUDA graphs


def resolve_limits(
    config: EngineConfig,
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype,
    plan_kv_blocks: Callable[[KVCachePlan, torch.device], int],
) -> EngineLimits:
    """The engine's limits; the KV block count from `plan_kv_blocks` (a memory measurement) unless given."""
    max_seq_len = config.max_seq_len or model_config.max_position_embeddings
    if max_seq_len > model_config.max_position_embeddings:
        raise UserInputError(
            f"max_seq_len={max_seq_len} exceeds the model's context of {model_config.max_position_embeddings} tokens"
        )
    max_batch_size = config.max_batch_size or (256 if device.type == "cuda" else 32)
    max_num_tokens = config.max_num_tokens or (8192 if device.type == "cuda" else 2048)
    num_kv_blocks = config.num_kv_blocks or plan_kv_blocks(
        KVCachePlan(
            config.block_size,
            max_seq_len,
            max_batch_size,
            max_num_tokens,
            config.kv_cache_memory_fraction,
            kv_cache_dtype,
        ),
        device,
    )
    if num_kv_blocks - 1 < -(-max_seq_len // config.block_size):
        raise UserInputError(
            f"num_kv_blocks={num_kv_blocks} cannot hold one sequence of max_seq_len={max_seq_len} "
            f"({config.block_size} tokens per block, block 0 reserved); raise it or lower max_seq_len"
        )
    return EngineLimits(
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        max_seq_len=max_seq_len,
        block_size=config.block_size,
        num_kv_blocks=num_kv_blocks,
        attention_backend=config.attention_backend,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        kv_cache_dtype=str(kv_cache_dtype).removeprefix("torch."),
    )


def validate_prompt(prompt_token_ids: list[int], max_tokens: int, vocab_size: int, max_seq_len: int) -> None:
    """Refuse a prompt up front (UserInputError) if it is empty, has ids outside the vocabulary, or cannot fit."""
    if not prompt_token_ids:
        raise UserInputError("the prompt is empty; give at least one token")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise UserInputError(f"prompt token ids must be in [0, {vocab_size}) for this model")
    total = len(prompt_token_ids) + max_tokens
    if total > max_seq_len:
        raise UserInputError(
            f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
            f"max_seq_len={max_seq_len}; shorten the prompt or lower max_tokens"
        )
