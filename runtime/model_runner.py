"""The model runner: packs a step's chunks into one flat batch, runs the model, samples.

One forward per step over `input_ids[num_tokens]`, whatever mix of prefill chunks and decodes the
scheduler chose; attention finds each sequence through `cu_seqlens_q`, `seq_lens`, `slot_mapping`
and `block_tables`. Logits are computed only for the rows that sample (plus prompt positions whose
logprobs were asked). The one host sync per step is reading the sampled token ids back.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.core.host_transfer import to_device
from kiln.kernels.attention import AttentionMetadata
from kiln.kernels.attention_backends import AttentionBackend
from kiln.models.config import ModelConfig
from kiln.models.layers import Attention
from kiln.models.parallel import broadcast_from_first_rank, tensor_parallel
from kiln.runtime.cuda_graphs import DecodeGraphs
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.logprob_collection import prompt_logprob_jobs, prompt_logprobs, sampled_logprobs
from kiln.runtime.mixed_graphs import MixedStepGraphs
from kiln.runtime.outputs import TopLogprobs
from kiln.runtime.request import Request
from kiln.runtime.sampler import Sampler, SamplerOutput, SamplingBatch, suppress_tokens
from kiln.runtime.scheduler import ScheduledChunk, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    """What one step produced, by request id."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TopLogprobs] = field(default_factory=dict)
    # prompt logprobs for the positions this step computed: one entry per prompt token after the first
    prompt_logprobs: dict[str, list[TopLogprobs]] = field(default_factory=dict)


@dataclass
class _FlatBatch:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # flat index of the last token of sampling chunks
    sampling_requests: list[Request] = field(default_factory=list)
    pending_rows: list[int] = field(default_factory=list)  # flat rows whose token the step in flight samples
    pending_sources: list[int] = field(default_factory=list)  # ... at these rows of its sampled tokens


@dataclass
class StepInputs:
    """What every tensor-parallel rank needs for one step (rank 0 broadcasts it; picklable lists only)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    logit_rows: list[list[int]]  # row groups whose logits are computed, in order: prompt logprobs, then sampling
    # Rows of input_ids to take from the previous step's sampled tokens on the device (rank 0 alone uses them).
    pending_rows: list[int] = field(default_factory=list)
    pending_sources: list[int] = field(default_factory=list)
    num_previous_tokens: int = 0  # tokens the previous step sampled (other ranks receive them from rank 0)


@dataclass
class LaunchedStep:
    """A step whose kernels are queued; `ModelRunner.finish` waits for its tokens."""

    scheduled: SchedulerOutput
    sampling_requests: list[Request]
    prompt_logprobs: dict[str, list[TopLogprobs]]  # read at launch: their logits are too big to keep
    sampled: SamplerOutput | None = None
    host_token_ids: torch.Tensor | None = None  # pinned copy of the tokens, queued after the sampler
    copied: torch.cuda.Event | None = None


def kv_cache_block_bytes(
    config: ModelConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None
) -> int:
    """Bytes of one KV block across all layers, or `num_layers` of them (keys and values)."""
    element_bytes = torch.tensor([], dtype=dtype).element_size()
    num_layers = config.num_layers if num_layers is None else num_layers
    return 2 * num_layers * block_size * config.num_kv_heads * config.head_dim * element_bytes


def kv_cache_scales(layer: Attention, cache_dtype: torch.dtype) -> tuple[float, float]:
    """(k_scale, v_scale) of one layer's cache: the checkpoint's for FP8, 1 for FP8 without any or other dtypes."""
    if cache_dtype != torch.float8_e4m3fn:
        return 1.0, 1.0
    return layer.calibrated_kv_scales() or (1.0, 1.0)


def eager_inputs(step: StepInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids, positions, attention metadata) of a step on the device, for a forward without a graph."""
    metadata = AttentionMetadata.build(
        query_lens=step.query_lens,
        seq_lens=step.seq_lens,
        device=device,
        slot_mapping=step.slot_mapping,
        block_tables=step.block_tables,
    )
    staged = to_device([step.input_ids, step.positions], torch.int64, device, align_rows=True)  # [2, num_tokens]
    return staged[0], staged[1], metadata


def select_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden[rows] without a host sync: a slice when the rows are consecutive (every decode step)."""
    first = rows[0]
    if rows[-1] - first == len(rows) - 1 and all(row == first + i for i, row in enumerate(rows)):
        return hidden[first : first + len(rows)]
    return hidden[to_device(rows, torch.int64, hidden.device)]


class ModelRunner:
    """Owns the model, its KV cache tensors and the sampler."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        kv_cache: KVCacheManager,
        num_blocks: int,
        block_size: int,
        backend: AttentionBackend,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.kv_cache = kv_cache
        self.block_size = block_size
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.kv_cache_dtype = kv_cache_dtype or self.dtype
        self.sampler = Sampler()
        self.decode_graphs: DecodeGraphs | None = None  # set by the engine after capture (CUDA + Triton only)
        self.mixed_graphs: MixedStepGraphs | None = None  # steps with prompt tokens (one GPU, CUDA + Triton)
        self.broadcast: Callable[[StepInputs | None], None] | None = None  # set under tensor parallelism
        self._previous_tokens = torch.zeros(0, dtype=torch.int64, device=self.device)  # the last launch's samples
        self._previous_rows: dict[str, int] = {}  # request id -> row of _previous_tokens
        self.attention_layers = [module for module in model.modules() if isinstance(module, Attention)]
        for layer in self.attention_layers:
            shape = (num_blocks, block_size, layer.num_kv_heads, config.head_dim)  # this rank's KV heads
            # [num_blocks, block_size, num_kv_heads, head_dim] per layer; allocated once, never resized.
            # Not zeroed: attention reads only slots written for the sequence and masks the rest (padding,
            # the null block), and filling a 2 GiB CPU cache with zeros took 3 s of every start.
            layer.k_cache = torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
            layer.v_cache = torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
            layer.attention_fn = backend.forward
            layer.backend_takes_rotary = backend.takes_rotary
            layer.kv_cache_scales = kv_cache_scales(layer, self.kv_cache_dtype)
        logger.debug("KV cache: %d blocks of %d tokens, attention backend %s", num_blocks, block_size, backend.name)

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput) -> LaunchedStep:
        """Queue one step's forward and sampling without waiting for the device (prompt logprobs excepted).

        Rows whose input is the token the previous launch sampled read it from that launch's device tensor;
        the previous launch must be the step before this one.
        """
        batch = self._pack(scheduled.chunks)
        prompt_jobs = prompt_logprob_jobs(scheduled.chunks)
        rows = [job.rows for job in prompt_jobs] + ([batch.sample_rows] if batch.sample_rows else [])
        step = StepInputs(
            batch.input_ids, batch.positions, batch.slot_mapping, batch.query_lens, batch.seq_lens,
            batch.block_tables, rows, batch.pending_rows, batch.pending_sources, len(self._previous_rows),
        )  # fmt: skip
        if self.broadcast is not None:
            self.broadcast(step)  # the other ranks run the same forward and logits with their shards
        logits = self.run_step(step)
        launched = LaunchedStep(
            scheduled, batch.sampling_requests, prompt_logprobs(prompt_jobs, logits[: len(prompt_jobs)])
        )
        if batch.sample_rows:
            self._sample(logits[-1], batch.sampling_requests, launched)
        else:
            self._previous_rows = {}
        return launched

    def finish(self, launched: LaunchedStep) -> RunnerOutput:
        """Wait for a launched step's tokens and read them (and logprobs) back."""
        output = RunnerOutput(prompt_logprobs=launched.prompt_logprobs)
        result = launched.sampled
        if result is None:
            return output
        if launched.copied is not None:
            launched.copied.synchronize()  # the step's one wait for the device
            token_ids = launched.host_token_ids.tolist()
        else:
            token_ids = result.sampled_token_ids.tolist()
        output.sampled = {request.request_id: token for request, token in zip(launched.sampling_requests, token_ids)}
        if result.sampled_logprobs is not None:
            output.logprobs = sampled_logprobs(launched.sampling_requests, token_ids, result)
        return output

    @torch.inference_mode()
    def run_step(self, step: StepInputs) -> list[torch.Tensor]:
        """Forward over the step's tokens, then fp32 logits of each row group (every rank runs this)."""
        if step.pending_rows and tensor_parallel().size > 1:
            self._share_previous_tokens(step.num_previous_tokens)
        hidden = self._forward(step)  # [num_tokens, hidden]
        return [self.model.compute_logits(select_rows(hidden, rows)) for rows in step.logit_rows]

    def _forward(self, batch: StepInputs) -> torch.Tensor:
        """Replay a captured graph for steps that fit one (decode, or with prompt tokens); run eagerly otherwise."""
        graphs, mixed = self.decode_graphs, self.mixed_graphs
        num_tokens = len(batch.input_ids)
        is_decode = num_tokens == len(batch.query_lens)  # one new token per sequence
        if graphs is not None and is_decode and graphs.can_run(num_tokens):
            return graphs.run(
                batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens, batch.block_tables,
                fill_inputs=lambda input_ids: self._fill_pending(input_ids, batch),
            )  # fmt: skip
        if mixed is not None and not is_decode and mixed.can_run(num_tokens, len(batch.query_lens)):
            return mixed.run(batch, fill_inputs=lambda input_ids: self._fill_pending(input_ids, batch))
        input_ids, positions, metadata = eager_inputs(batch, self.device)
        self._fill_pending(input_ids, batch)
        return self.model(input_ids, positions, metadata)

    def _share_previous_tokens(self, count: int) -> None:
        """Rank 0's tokens of the previous step on every rank, device to device (no rank waits for its host)."""
        if tensor_parallel().rank != 0:
            self._previous_tokens = torch.empty(count, dtype=torch.int64, device=self.device)
        broadcast_from_first_rank(self._previous_tokens)

    def _fill_pending(self, input_ids: torch.Tensor, step: StepInputs) -> None:
        """Write the previous step's sampled tokens into the rows that take them, on the device."""
        if step.pending_rows:
            index = to_device([step.pending_rows, step.pending_sources], torch.int64, self.device)  # [2, n]
            input_ids.index_copy_(0, index[0], self._previous_tokens.index_select(0, index[1]))

    def _pack(self, chunks: list[ScheduledChunk]) -> _FlatBatch:
        batch = _FlatBatch()
        block_size = self.block_size
        for chunk in chunks:
            request, start, end = chunk.request, chunk.start, chunk.start + chunk.num_new_tokens
            block_ids = self.kv_cache.block_ids(request.request_id)
            if end - start == 1 and chunk.samples:  # a decode: no slices or ranges (every row, every step)
                self._pack_decode(batch, request, start, block_ids)
                continue
            known = request.token_ids[start:end]
            if len(known) < end - start:  # its last input is the token the step in flight samples
                batch.pending_rows.append(len(batch.input_ids) + len(known))
                batch.pending_sources.append(self._previous_rows[request.request_id])
                known.append(0)
            batch.input_ids += known
            batch.positions += range(start, end)
            batch.slot_mapping += [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
            batch.query_lens.append(chunk.num_new_tokens)
            batch.seq_lens.append(end)
            batch.block_tables.append(block_ids)
            if chunk.samples:
                batch.sample_rows.append(len(batch.input_ids) - 1)
                batch.sampling_requests.append(request)
        return batch

    def _pack_decode(self, batch: _FlatBatch, request: Request, position: int, block_ids: list[int]) -> None:
        """One sampling row at `position`: what _pack's general path appends for a one-token chunk."""
        row = len(batch.input_ids)
        if position < len(request.token_ids):
            batch.input_ids.append(request.token_ids[position])
        else:  # its input is the token the step in flight samples
            batch.pending_rows.append(row)
            batch.pending_sources.append(self._previous_rows[request.request_id])
            batch.input_ids.append(0)
        batch.positions.append(position)
        block_size = self.block_size
        batch.slot_mapping.append(block_ids[position // block_size] * block_size + position % block_size)
        batch.query_lens.append(1)
        batch.seq_lens.append(position + 1)
        batch.block_tables.append(block_ids)
        batch.sample_rows.append(row)
        batch.sampling_requests.append(request)

    def _sample(self, logits: torch.Tensor, requests: list[Request], launched: LaunchedStep) -> None:
        """Queue sampling from the logits [num_sampling, vocab] (fp32) and the tokens' copy to the host."""
        self._suppress_early_stops(logits, requests)
        sampling = SamplingBatch.build(
            [request.sampling_params for request in requests],
            [request.seed for request in requests],
            [request.prompt_token_ids for request in requests],
            [request.output_token_ids for request in requests],
            self.device,
            output_positions=[request.num_output_tokens - 1 for request in requests],  # the new token's
        )
        result = self.sampler(logits, sampling)
        launched.sampled = result
        # The next step reads these rows' tokens from the device before this one is finished.
        self._previous_tokens = result.sampled_token_ids
        self._previous_rows = {request.request_id: row for row, request in enumerate(requests)}
        if self.device.type == "cuda":
            launched.host_token_ids = torch.empty(len(requests), dtype=torch.int64, pin_memory=True)
            launched.host_token_ids.copy_(result.sampled_token_ids, non_blocking=True)
            launched.copied = torch.cuda.Event()
            launched.copied.record()

    def _suppress_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Below min_tokens, EOS and stop tokens cannot be sampled."""
        rows, banned = [], []
        for row, request in enumerate(requests):
            params = request.sampling_params
            if request.num_output_tokens - 1 < params.min_tokens:  # the count before the token sampled now
                stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(request.eos_token_ids))
                if stop_ids:
                    rows.append(row)
                    banned.append(sorted(stop_ids))
        if rows:
            suppress_tokens(logits, rows, banned)
