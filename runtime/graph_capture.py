"""The engine's CUDA graphs, captured at start: decode steps on every rank, steps with prompt tokens on one GPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from kiln.runtime.cuda_graphs import DecodeGraphs, DecodeGraphSpec, capture_decode_graphs, default_bucket_sizes
from kiln.runtime.engine_limits import EngineLimits
from kiln.runtime.mixed_graphs import MixedStepGraphs, capture_mixed_graphs, mixed_graphs_enabled


def capture_engine_graphs(
    model: nn.Module,
    limits: EngineLimits,
    batch_sizes: tuple[int, ...] | None,
    pp_size: int,
    broadcast: Callable[[DecodeGraphSpec], None] | None,
    device: torch.device,
) -> tuple[DecodeGraphs, MixedStepGraphs | None, EngineLimits]:
    """(decode graphs, graphs for steps with prompt tokens or None, the limits with the captured batch sizes).

    broadcast: sends the decode spec to the other ranks (tensor parallelism, pipeline stages), which capture
    in step with this one since the graphs hold collectives. Steps with prompt tokens get graphs only without
    other ranks: those would have to replay them in step too.
    """
    # Pipeline stages replay graphs per micro-batch: a decode step's sequences split into pp_size of them.
    max_graph_rows = -(-limits.max_batch_size // pp_size)
    spec = DecodeGraphSpec(
        tuple(batch_sizes or default_bucket_sizes(max_graph_rows)),
        max_blocks_per_seq=-(-limits.max_seq_len // limits.block_size),
        capture_seq_len=limits.max_seq_len,
    )
    if broadcast is not None:
        broadcast(spec)
    graphs = capture_decode_graphs(model, spec, device)
    limits = dataclasses.replace(limits, cuda_graph_batch_sizes=tuple(graphs.bucket_sizes))
    mixed = None
    if broadcast is None and mixed_graphs_enabled():
        mixed = capture_mixed_graphs(
            model, limits.max_num_tokens, limits.max_batch_size, spec.max_blocks_per_seq, graphs.pool
        )
    return graphs, mixed, limits
