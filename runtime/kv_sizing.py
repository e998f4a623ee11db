"""How many KV blocks fit: measured after a warm-up at the largest batch, never guessed.

On a GPU, a warm-up forward at `max_num_tokens` (spread over `max_batch_size` sequences, with the
logits of every sequence) shows the activation peak; what is left under
`kv_cache_memory_fraction` of the card goes to KV blocks. On the CPU there is no card to fill: the
cache gets what `max_batch_size` sequences of `max_seq_len` need, capped at `cpu_kv_cache_bytes`.
With tensor or pipeline parallelism every rank plans at once (the warm-up forward has collectives in
it) and the group takes the smallest count: rank 0 hands out block ids every rank must hold.
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kiln.core.errors import UserInputError
from kiln.kernels.attention import AttentionMetadata
from kiln.models.config import ModelConfig
from kiln.models.layers import Attention
from kiln.models.parallel import tensor_parallel
from kiln.models.pipeline import pipeline_stage

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class KVCachePlan:
    """The sizes a rank plans its KV cache for (rank 0 sends it to every other rank, which plans alongside)."""

    block_size: int
    max_seq_len: int
    max_batch_size: int
    max_num_tokens: int
    memory_fraction: float
    kv_cache_dtype: torch.dtype


def plan_rank_kv_blocks(model: nn.Module, config: ModelConfig, device: torch.device, plan: KVCachePlan) -> int:
    """KV blocks for this rank's attention layers and KV heads (a shard under tensor parallelism, a stage's layers)."""
    element_bytes = torch.tensor([], dtype=plan.kv_cache_dtype).element_size()
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    block_bytes = sum(2 * plan.block_size * layer.num_kv_heads * config.head_dim * element_bytes for layer in layers)
    return plan_num_blocks(
        model=model,
        config=config,
        device=device,
        block_bytes=block_bytes,
        block_size=plan.block_size,
        max_seq_len=plan.max_seq_len,
        max_batch_size=plan.max_batch_size,
        max_num_tokens=plan.max_num_tokens,
        memory_fraction=plan.memory_fraction,
    )


def _smallest_over_ranks(value: int, device: torch.device) -> int:
    """The minimum of `value` over the ranks of this model (value itself for a model on one rank).

    Asked of the model's parallel state, not of torch.distributed: a one-rank engine in a process that
    still holds a group (an earlier engine's, a caller's) must not wait on it.
    """
    if tensor_parallel().size == 1 and pipeline_stage().size == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return int(box.item())


@torch.inference_mode()
def measure_activation_peak(model: nn.Module, max_num_tokens: int, max_batch_size: int, device: torch.device) -> int:
    """Peak bytes allocated above the weights during one forward + logits at the largest batch (CUDA)."""
    # Short sequences: the MLP and logits peaks depend on token and row counts only, while the
    # reference attention's [heads, L, L] scores would overstate the real (paged) kernels' needs.
    seq_len = max(1, min(256, max_num_tokens // max(1, max_batch_size)))
    num_seqs = max(1, max_num_tokens // seq_len)
    lengths = [seq_len] * num_seqs
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    input_ids = torch.zeros(sum(lengths), dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).repeat(num_seqs)
    stage = pipeline_stage()
    incoming = None  # a later pipeline stage starts from the previous one's hidden states and residual
    if not stage.is_first:
        dtype = next(model.parameters()).dtype
        incoming = torch.zeros(2, sum(lengths), model.config.hidden_size, dtype=dtype, device=device)
    hidden, _ = model.forward_stage(
        input_ids if stage.is_first else None,
        positions,
        AttentionMetadata.for_prefill(lengths, device),
        *(incoming if incoming is not None else ()),
    )
    if stage.is_last:  # only the last stage computes logits
        last_rows = torch.arange(seq_len - 1, sum(lengths), seq_len, device=device)[:max_batch_size]
        model.compute_logits(hidden[last_rows])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del hidden, incoming
    torch.cuda.empty_cache()
    return peak


def plan_num_blocks(
    *,
    model: nn.Module,
    config: ModelConfig,
    device: torch.device,
    block_bytes: int,
    block_size: int,
    max_seq_len: int,
    max_batch_size: int,
    max_num_tokens: int,
    memory_fraction: float,
    cpu_kv_cache_bytes: int = DEFAULT_CPU_KV_CACHE_BYTES,
) -> int:
    """Number of KV blocks (including the null block 0) for this model on this device."""
    blocks_per_seq = math.ceil(max_seq_len / block_size)
    if device.type == "cuda":
        peak = measure_activation_peak(model, max_num_tokens, max_batch_size, device)
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * memory_fraction) - (total - free) - peak
        where = (
            f"{memory_fraction:.0%} of {total / 2**30:.1f} GiB, minus {(total - free) / 2**30:.1f} GiB already in "
            f"use (these weights, other engines or processes) and a {peak / 2**30:.2f} GiB activation peak"
        )
    else:
        budget = min(cpu_kv_cache_bytes, blocks_per_seq * max_batch_size * block_bytes)
        where = f"the CPU cap of {cpu_kv_cache_bytes / 2**30:.1f} GiB"
    num_blocks = _smallest_over_ranks(max(0, budget // block_bytes), device)
    if num_blocks < blocks_per_seq:
        raise UserInputError(
            f"the KV cache holds {num_blocks * block_size} tokens ({where}), less than one sequence of "
            f"max_seq_len={max_seq_len}; lower max_seq_len or max_num_tokens, or raise kv_cache_memory_fraction"
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB), max concurrency at max_seq_len %d: %.1f",
        num_blocks,
        block_size,
        num_blocks * block_size,
        num_blocks * block_bytes / 2**30,
        max_seq_len,
        num_blocks / blocks_per_seq,
    )
    return num_blocks + 1  # block 0 is the null block
