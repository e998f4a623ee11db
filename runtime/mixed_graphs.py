"""CUDA graphs for steps with prompt tokens: one captured forward per token-count bucket.

A step that brings a prompt (alone, or with other sequences' decodes) runs eagerly unless it fits one of
these graphs. Launched eagerly, a forward costs the host ~19-22 ms of Python whatever its size (an 8B model,
~700 kernels), more than the GPU needs for a prompt of up to ~1,000 tokens in bf16 or ~1,500 in fp8 (issue
8's profiles), and more again when a server's HTTP thread shares the interpreter: such a prefill waits for
the host, not the GPU, and its time to first token grows with it. Replayed, it costs the host the input
copies and one launch.

A step of T tokens over S sequences replays the graph of the smallest bucket >= T, padded like the decode
graphs: padding tokens store nothing (slot -1) and belong to no sequence, and their hidden states are
dropped. The prefill attention kernel reads its sequences and its tile list from device buffers, so the
graph takes any mix of up to `max_seqs` sequences: their query offsets, context lengths and block tables
are copied into static buffers, with one padding sequence (no queries, no context) after them, and the tile
list is padded with tiles of that sequence, which return at once. The tiles are always 64 queries (the
eager path uses 16 for decode-heavy steps of short chunks): keys outside a query's reach are masked either
way, so the result is the same.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kiln.core.host_transfer import copy_into, pad_rows, to_device
from kiln.kernels.attention import AttentionMetadata
from kiln.runtime.cuda_graphs import capture_graph

if TYPE_CHECKING:
    from kiln.runtime.model_runner import StepInputs

logger = logging.getLogger(__name__)

TILE_QUERIES = 64  # the prefill kernel's tile (prefill_block_m of a step with > 16 queries in a sequence)
DEFAULT_MAX_SEQS = 64  # steps with more sequences run eagerly (a busy engine: the GPU is the limit there)
DEFAULT_MAX_TOKENS = 1024


def default_mixed_buckets(max_num_tokens: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[int]:
    """Every 32 tokens up to 128, every 64 up to 512, every 128 up to 1,024: at most ~25% padding over 128."""
    sizes = [32, 64, 96, 128] + list(range(192, 513, 64)) + list(range(640, 1025, 128))
    return [size for size in sizes if size <= min(max_tokens, max_num_tokens)]


def _aligned(num_int32: int) -> int:
    """num_int32 rounded up to whole 16-byte units."""
    return -(-num_int32 // 4) * 4


def _max_tiles(bucket: int, max_seqs: int) -> int:
    # Each sequence's queries make ceil(q / 64) tiles <= q / 64 + 1; one more column for a spare padding tile.
    return -(-bucket // TILE_QUERIES) + max_seqs + 1


class MixedStepGraphs:
    """Captured forwards of a model for steps with prompt tokens, one per token-count bucket."""

    def __init__(
        self, model: nn.Module, bucket_sizes: list[int], max_seqs: int, max_blocks_per_seq: int, device: torch.device
    ) -> None:
        self.model = model
        self.bucket_sizes = sorted(bucket_sizes)
        self.max_seqs = max_seqs
        self.padding_seq = max_seqs  # the sequence slot after the last real one: no queries, no context
        num_slots = max_seqs + 1
        max_tokens = self.bucket_sizes[-1]
        # Static inputs, written in place before each replay. tokens: [input ids, positions, slots].
        self.tokens = torch.zeros(3, max_tokens, dtype=torch.int64, device=device)
        # sequences: [cu_seqlens_q (num_slots + 1) | seq_lens (num_slots) | the tile list of the largest bucket],
        # each part 16-byte aligned: the kernels compiled at capture are then the variants eager steps use
        # (Triton compiles one per pointer alignment class), and neither path compiles the other's later.
        self._lens_offset = _aligned(num_slots + 1)
        self._tiles_offset = self._lens_offset + _aligned(num_slots)
        self.sequences = torch.zeros(
            self._tiles_offset + 2 * _max_tiles(max_tokens, max_seqs), dtype=torch.int32, device=device
        )
        self.block_tables = torch.zeros(num_slots, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.num_replays = 0

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        """Whether a step of this many tokens and sequences has a graph."""
        return bool(self._graphs) and 0 < num_tokens <= self.bucket_sizes[-1] and num_seqs <= self.max_seqs

    def bucket(self, num_tokens: int) -> int:
        """The smallest captured token count >= num_tokens."""
        return self.bucket_sizes[bisect.bisect_left(self.bucket_sizes, num_tokens)]

    def _metadata(self, bucket: int) -> AttentionMetadata:
        num_slots = self.max_seqs + 1
        max_tiles = _max_tiles(bucket, self.max_seqs)
        tiles = self.sequences[self._tiles_offset : self._tiles_offset + 2 * max_tiles].view(2, max_tiles)
        return AttentionMetadata(
            cu_seqlens_q=self.sequences[: num_slots + 1],
            seq_lens=self.sequences[self._lens_offset : self._lens_offset + num_slots],
            slot_mapping=self.tokens[2, :bucket],
            block_tables=self.block_tables,
            # Host lists of a prefill-shaped step: they pick the prefill kernel with 64-query tiles, whose tile
            # list is the static one above (read from `derived`, never built from these lists).
            cu_seqlens_q_host=[0] + [bucket] * num_slots,
            seq_lens_host=[bucket] * num_slots,
            derived={f"prefill_tiles_{TILE_QUERIES}": tiles},
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model(self.tokens[0, :bucket], self.tokens[1, :bucket], self._metadata(bucket))

    def fill(self, step: StepInputs) -> int:
        """Copy a step's inputs into the static buffers, padded to its bucket; returns the bucket."""
        from kiln.kernels.triton_prefill_attention import build_tiles  # imports triton: CUDA machines only

        num_tokens, num_seqs = len(step.input_ids), len(step.query_lens)
        bucket = self.bucket(num_tokens)
        tokens = np.zeros((3, bucket), dtype=np.int64)
        tokens[0, :num_tokens] = step.input_ids
        tokens[1, :num_tokens] = step.positions
        tokens[2, :num_tokens] = step.slot_mapping
        tokens[2, num_tokens:] = -1  # padding tokens store nothing
        self.tokens[:, :bucket].copy_(to_device(tokens, torch.int64, self.tokens.device))

        num_slots = self.max_seqs + 1
        cu_seqlens = np.full(num_slots + 1, num_tokens, dtype=np.int64)  # padding slots: no queries
        cu_seqlens[0] = 0
        cu_seqlens[1 : num_seqs + 1] = np.cumsum(step.query_lens)
        seq_lens = np.zeros(num_slots, dtype=np.int64)
        seq_lens[:num_seqs] = step.seq_lens
        max_tiles = _max_tiles(bucket, self.max_seqs)
        tiles = np.zeros((2, max_tiles), dtype=np.int64)
        tiles[0, :] = self.padding_seq
        real = build_tiles(cu_seqlens[: num_seqs + 1].tolist(), list(step.seq_lens), TILE_QUERIES)
        tiles[:, : len(real[0])] = real
        packed = np.zeros(self._tiles_offset + 2 * max_tiles, dtype=np.int64)
        packed[: num_slots + 1] = cu_seqlens
        packed[self._lens_offset : self._lens_offset + num_slots] = seq_lens
        packed[self._tiles_offset :] = tiles.reshape(-1)
        self.sequences[: len(packed)].copy_(to_device(packed, torch.int32, self.sequences.device))
        # Only the columns in use are written: the kernel reads a row's blocks up to its context length.
        width = max(len(row) for row in step.block_tables)
        copy_into(self.block_tables[:num_seqs, :width], pad_rows(step.block_tables, num_seqs, width, 0, torch.int32))
        return bucket

    @torch.inference_mode()
    def capture(self, pool: object | None = None) -> None:
        """Capture every bucket, largest first, in `pool` (shared with the decode graphs) or a new one."""
        self.sequences.zero_()  # no sequence anywhere: the captures' warm-up forwards attend to nothing
        self.tokens[2].fill_(-1)
        for bucket in reversed(self.bucket_sizes):
            tiles = self._metadata(bucket).derived[f"prefill_tiles_{TILE_QUERIES}"]
            tiles[0].fill_(self.padding_seq)
            tiles[1].zero_()
            graph, output = capture_graph(partial(self._forward, bucket), pool)  # output: [bucket, hidden]
            pool = graph.pool()
            self._graphs[bucket] = (graph, output)
        self.pool = pool
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for steps with prompt tokens: token counts %s", self.bucket_sizes)

    def run(self, step: StepInputs, fill_inputs: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Replay the bucket's graph for this step; returns hidden states [num_tokens, hidden].

        fill_inputs, if given, may overwrite input ids on the device (tokens the previous step sampled). The
        result is a view of the graph's output, which the next replay of any graph in the pool overwrites.
        """
        bucket = self.fill(step)
        if fill_inputs is not None:
            fill_inputs(self.tokens[0, : len(step.input_ids)])
        graph, output = self._graphs[bucket]
        graph.replay()
        self.num_replays += 1
        return output[: len(step.input_ids)]


def mixed_graphs_enabled() -> bool:
    """KILN_MIXED_STEP_GRAPHS=0 runs every step with prompt tokens eagerly (for A/B runs)."""
    return os.environ.get("KILN_MIXED_STEP_GRAPHS", "1") != "0"


def capture_mixed_graphs(
    model: nn.Module, max_num_tokens: int, max_batch_size: int, max_blocks_per_seq: int, pool: object | None
) -> MixedStepGraphs | None:
    """The graphs for this engine's limits, captured in `pool` (the decode graphs'); None if none fits."""
    buckets = default_mixed_buckets(max_num_tokens)
    if not buckets:
        return None
    device = next(model.parameters()).device
    graphs = MixedStepGraphs(model, buckets, min(DEFAULT_MAX_SEQS, max_batch_size), max_blocks_per_seq, device)
    graphs.capture(pool)
    return graphs
