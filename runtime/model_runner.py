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
from kiln.runtime.cuda_graphs import DecodeGraphs
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request
from kiln.runtime.sampler import Sampler, SamplingBatch, suppress_tokens
from kiln.runtime.scheduler import ScheduledChunk, SchedulerOutput

logger = logging.getLogger(__name__)

TopLogprobs = dict[int, float]  # token id -> logprob


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
    staged = to_device([step.input_ids, step.positions], torch.int64, device)  # [2, num_tokens]
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
        self.broadcast: Callable[[StepInputs | None], None] | None = None  # set under tensor parallelism
        self.attention_layers = [module for module in model.modules() if isinstance(module, Attention)]
        for layer in self.attention_layers:
            shape = (num_blocks, block_size, layer.num_kv_heads, config.head_dim)  # this rank's KV heads
            # [num_blocks, block_size, num_kv_heads, head_dim] per layer; allocated once, never resized.
            # Not zeroed: attention reads only slots written for the sequence and masks the rest (padding,
            # the null block), and filling a 2 GiB CPU cache with zeros took 3 s of every start.
            layer.k_cache = torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
            layer.v_cache = torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
            layer.attention_fn = backend.forward
            layer.kv_cache_scales = kv_cache_scales(layer, self.kv_cache_dtype)
        logger.debug("KV cache: %d blocks of %d tokens, attention backend %s", num_blocks, block_size, backend.name)

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Run one step: forward over the flat batch, then sample for the chunks that end their tokens."""
        batch = self._pack(scheduled.chunks)
        prompt_jobs = self._prompt_logprob_jobs(scheduled.chunks)
        rows = [job[3] for job in prompt_jobs] + ([batch.sample_rows] if batch.sample_rows else [])
        step = StepInputs(
            batch.input_ids, batch.positions, batch.slot_mapping, batch.query_lens, batch.seq_lens,
            batch.block_tables, rows,
        )  # fmt: skip
        if self.broadcast is not None:
            self.broadcast(step)  # the other ranks run the same forward and logits with their shards
        logits = self.run_step(step)
        output = RunnerOutput()
        self._prompt_logprobs(prompt_jobs, logits[: len(prompt_jobs)], output)
        if batch.sample_rows:
            self._sample(logits[-1], batch, output)
        return output

    @torch.inference_mode()
    def run_step(self, step: StepInputs) -> list[torch.Tensor]:
        """Forward over the step's tokens, then fp32 logits of each row group (every rank runs this)."""
        hidden = self._forward(step)  # [num_tokens, hidden]
        return [self.model.compute_logits(select_rows(hidden, rows)) for rows in step.logit_rows]

    def _forward(self, batch: StepInputs) -> torch.Tensor:
        """Replay a captured graph for pure decode steps that fit one; run eagerly otherwise."""
        graphs = self.decode_graphs
        is_decode = len(batch.input_ids) == len(batch.query_lens)  # one new token per sequence
        if graphs is not None and is_decode and graphs.can_run(len(batch.input_ids)):
            return graphs.run(batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens, batch.block_tables)
        return self.model(*eager_inputs(batch, self.device))

    def _pack(self, chunks: list[ScheduledChunk]) -> _FlatBatch:
        batch = _FlatBatch()
        block_size = self.block_size
        for chunk in chunks:
            request, start, end = chunk.request, chunk.start, chunk.start + chunk.num_new_tokens
            block_ids = self.kv_cache.block_ids(request.request_id)
            batch.input_ids += request.token_ids[start:end]
            batch.positions += range(start, end)
            batch.slot_mapping += [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
            batch.query_lens.append(chunk.num_new_tokens)
            batch.seq_lens.append(end)
            batch.block_tables.append(block_ids)
            if chunk.samples:
                batch.sample_rows.append(len(batch.input_ids) - 1)
                batch.sampling_requests.append(request)
        return batch

    def _sample(self, logits: torch.Tensor, batch: _FlatBatch, output: RunnerOutput) -> None:
        """Sample from the logits [num_sampling, vocab] (fp32) of the rows that end their tokens."""
        requests = batch.sampling_requests
        self._suppress_early_stops(logits, requests)
        sampling = SamplingBatch.build(
            [request.sampling_params for request in requests],
            [request.seed for request in requests],
            [request.prompt_token_ids for request in requests],
            [request.output_token_ids for request in requests],
            self.device,
        )
        result = self.sampler(logits, sampling)
        token_ids = result.sampled_token_ids.tolist()  # the step's one host sync
        for request, token_id in zip(requests, token_ids):
            output.sampled[request.request_id] = token_id
        if result.sampled_logprobs is not None:
            self._collect_logprobs(requests, token_ids, result, output)

    def _suppress_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Below min_tokens, EOS and stop tokens cannot be sampled."""
        rows, banned = [], []
        for row, request in enumerate(requests):
            params = request.sampling_params
            if len(request.output_token_ids) < params.min_tokens:
                stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(request.eos_token_ids))
                if stop_ids:
                    rows.append(row)
                    banned.append(sorted(stop_ids))
        if rows:
            suppress_tokens(logits, rows, banned)

    def _collect_logprobs(self, requests: list[Request], token_ids: list[int], result, output: RunnerOutput) -> None:
        sampled_logprobs = result.sampled_logprobs.tolist()
        top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
        top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        for row, request in enumerate(requests):
            wanted = request.sampling_params.logprobs
            if wanted is None:
                continue
            entry = {token_ids[row]: sampled_logprobs[row]}
            if top_ids is not None and wanted > 0:
                entry.update(zip(top_ids[row][:wanted], top_values[row][:wanted]))
            output.logprobs[request.request_id] = entry

    def _prompt_logprob_jobs(self, chunks: list[ScheduledChunk]) -> list[tuple[Request, int, int, list[int]]]:
        """(request, first, last, flat rows) of each chunk whose prompt positions [first, last) need logprobs."""
        jobs, offset = [], 0
        for chunk in chunks:
            request = chunk.request
            # Position p predicts prompt token p + 1; entries already collected (before a preemption) are kept.
            first = max(chunk.start, len(request.prompt_logprobs))
            last = min(chunk.start + chunk.num_new_tokens, request.num_prompt_tokens - 1)
            if request.sampling_params.prompt_logprobs is not None and first < last:
                jobs.append(
                    (request, first, last, list(range(offset + first - chunk.start, offset + last - chunk.start)))
                )
            offset += chunk.num_new_tokens
        return jobs

    def _prompt_logprobs(self, jobs: list, logits: list[torch.Tensor], output: RunnerOutput) -> None:
        """Logprob of each prompt token given the tokens before it (positions computed this step)."""
        for (request, first, last, _), job_logits in zip(jobs, logits):
            wanted = request.sampling_params.prompt_logprobs
            logprobs = torch.log_softmax(job_logits, dim=-1)  # [n, vocab]
            targets = to_device(request.token_ids[first + 1 : last + 1], torch.int64, self.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            entries = [{target: value} for target, value in zip(targets.tolist(), chosen)]
            if wanted > 0:
                top_values, top_ids = logprobs.topk(wanted, dim=-1)
                for entry, ids, values in zip(entries, top_ids.tolist(), top_values.tolist()):
                    entry.update(zip(ids, values))
            output.prompt_logprobs[request.request_id] = entries
