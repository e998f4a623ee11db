"""CUDA graphs for decode steps: one captured forward per batch-size bucket, replayed every step.

A decode step (every sequence brings one token) launches hundreds of small kernels; replaying a
graph removes their launch gaps. A step of B sequences runs the graph of the smallest bucket >= B,
padded: padding rows store nothing (slot -1) and attend to the null block 0, and their outputs are
dropped. The metadata buffers are preallocated once for the largest bucket and never reallocated
after capture (a graph replays fixed addresses): each step only copies new values into them.

Under pipeline parallelism each stage captures its own part of the forward for one micro-batch: stages
after the first start from a static [2, rows, hidden] buffer (the previous stage's hidden states and
residual, copied in before each replay), and stages before the last end with the pair stacked, ready to
send. The sends and receives stay outside the graphs, so a stage overlaps micro-batches as it does eagerly.
"""

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from kiln.core.host_transfer import copy_into, pad_rows, to_device
from kiln.kernels.attention import AttentionMetadata
from kiln.models.pipeline import pipeline_stage

logger = logging.getLogger(__name__)

NULL_BLOCK_ID = 0


def default_bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 up to 512, every 128 beyond, and
    max_batch_size itself: a step pads to at most ~12% more rows below 512, ~25% above.

    Every decode batch size in use gets a graph: a 1024-sequence decode step run eagerly was host-bound
    on an H200 (TPOT 88 ms against 62 ms from a graph, bf16 128/128). Above 512 the buckets are sparser,
    since each captured size adds start-up time.
    """
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 257, 16)) + list(range(288, 513, 32))
    sizes += list(range(640, max_batch_size, 128))
    return sorted({size for size in sizes if size < max_batch_size} | {max_batch_size})


def capture_graph(
    forward: Callable[[], torch.Tensor], pool: object | None
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, its output) of `forward`, run twice first off the capture (which compiles its Triton kernels for
    these shapes); the graph allocates in `pool` (None: a new one), and its output lives there."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph, output


@dataclass(frozen=True)
class DecodeGraphSpec:
    """What to capture (rank 0 sends it to tensor-parallel workers, which capture in step with it)."""

    bucket_sizes: tuple[int, ...]
    max_blocks_per_seq: int
    capture_seq_len: int


def capture_decode_graphs(model: nn.Module, spec: DecodeGraphSpec, device: torch.device) -> "DecodeGraphs":
    """Capture the spec's decode graphs of this model on this device."""
    graphs = DecodeGraphs(model, list(spec.bucket_sizes), spec.max_blocks_per_seq, spec.capture_seq_len, device)
    graphs.capture()
    return graphs


class DecodeGraphs:
    """Captured decode forwards of a model, one per batch-size bucket."""

    def __init__(
        self,
        model: nn.Module,
        bucket_sizes: list[int],
        max_blocks_per_seq: int,
        capture_seq_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.bucket_sizes = sorted(bucket_sizes)
        self.max_batch_size = self.bucket_sizes[-1]
        self.capture_seq_len = capture_seq_len  # the context the decode kernel's split count is chosen for
        size = self.max_batch_size
        # Static inputs, written in place before each replay; never reallocated after capture.
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.block_tables = torch.full((size, max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(size + 1, dtype=torch.int32, device=device)  # one query per sequence
        self.stage = pipeline_stage()
        self.stage_inputs = None  # [2, rows, hidden]: what the previous pipeline stage sent, stages after the first
        if not self.stage.is_first:
            parameter = next(model.parameters())
            hidden_size = model.config.hidden_size
            self.stage_inputs = torch.zeros(2, size, hidden_size, dtype=parameter.dtype, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the graphs' memory pool, after capture (the mixed-step graphs share it)
        self.num_replays = 0

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            slot_mapping=self.slot_mapping[:batch_size],
            block_tables=self.block_tables[:batch_size],
            cu_seqlens_q_host=list(range(batch_size + 1)),
            # Host view used only to size the decode kernel's splits: fixed at capture for the longest context.
            seq_lens_host=[self.capture_seq_len] * batch_size,
        )

    def _forward(self, batch_size: int) -> torch.Tensor:
        """The captured work: the model's forward, or this pipeline stage's part of it, over the static inputs."""
        input_ids, positions, metadata = (
            self.input_ids[:batch_size],
            self.positions[:batch_size],
            self._metadata(batch_size),
        )
        if self.stage.size == 1:
            return self.model(input_ids, positions, metadata)  # [batch_size, hidden]
        hidden, residual = None, None
        if self.stage_inputs is not None:
            hidden, residual = self.stage_inputs[0, :batch_size], self.stage_inputs[1, :batch_size]
        hidden, residual = self.model.forward_stage(input_ids, positions, metadata, hidden, residual)
        # The last stage's final-norm output [batch_size, hidden]; earlier stages' [2, batch_size, hidden] to send
        return hidden if self.stage.is_last else torch.stack([hidden, residual])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        pool = None
        for batch_size in reversed(self.bucket_sizes):
            graph, output = capture_graph(partial(self._forward, batch_size), pool)
            pool = graph.pool()
            self._graphs[batch_size] = (graph, output)
        self.pool = pool
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.bucket_sizes)

    def can_run(self, batch_size: int) -> bool:
        """Whether a decode step of this many sequences has a graph."""
        return 0 < batch_size <= self.max_batch_size and bool(self._graphs)

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        fill_inputs: Callable[[torch.Tensor], None] | None = None,
        stage_inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay the bucket's graph for this decode batch; returns hidden states [batch_size, hidden].

        fill_inputs, if given, may overwrite input ids on the device (tokens the previous step sampled).
        A pipeline stage after the first passes what the previous stage sent, [2, batch_size, hidden]; a stage
        before the last gets [2, batch_size, hidden] back. The result is a view of the graph's output, which
        the next replay overwrites: copy it before sending it anywhere.
        """
        batch_size = len(input_ids)
        bucket = self.bucket_sizes[bisect.bisect_left(self.bucket_sizes, batch_size)]
        # One host array for the four per-sequence inputs; padding rows store nothing (slot -1) and see a
        # context of one token in the null block.
        columns = np.empty((4, bucket), dtype=np.int64)
        columns[:, batch_size:] = np.array([[0], [0], [-1], [1]])
        columns[0, :batch_size] = input_ids
        columns[1, :batch_size] = positions
        columns[2, :batch_size] = slot_mapping
        columns[3, :batch_size] = seq_lens
        staged = to_device(columns, torch.int64, self.input_ids.device)  # [4, bucket]
        self.input_ids[:bucket].copy_(staged[0])
        self.positions[:bucket].copy_(staged[1])
        self.slot_mapping[:bucket].copy_(staged[2])
        self.seq_lens[:bucket].copy_(staged[3])
        if fill_inputs is not None:
            fill_inputs(self.input_ids[:batch_size])
        # Only the columns in use are written: the kernels read a row's blocks up to its seq_len, so stale
        # ids further right are never read (and are valid block ids anyway).
        width = max(len(row) for row in block_tables)
        copy_into(self.block_tables[:bucket, :width], pad_rows(block_tables, bucket, width, NULL_BLOCK_ID, torch.int32))
        if self.stage_inputs is not None:
            self.stage_inputs[:, :batch_size].copy_(stage_inputs)  # padding rows keep old finite values
        graph, output = self._graphs[bucket]
        graph.replay()
        self.num_replays += 1
        return output[..., :batch_size, :]
