"""The engine: `step = schedule -> execute -> update`, plus requests in and outputs out."""

import dataclasses
import itertools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.core.dtypes import torch_dtype
from kiln.core.errors import UserInputError
from kiln.kernels.attention_backends import select_attention_backend
from kiln.models.layers import Attention
from kiln.models.loader import load_model
from kiln.runtime.cuda_graphs import DecodeGraphs, DecodeGraphSpec, capture_decode_graphs, default_bucket_sizes
from kiln.runtime.engine_artifact import apply_engine_options, engine_manifest, prepare_engine
from kiln.runtime.engine_config import EngineConfig, resolve_device, resolve_kv_cache_dtype
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.kv_sizing import KVCachePlan, plan_rank_kv_blocks
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.parallel_launch import start_other_ranks
from kiln.runtime.request import Request
from kiln.runtime.request_group import RequestGroup
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.tokenizer import eos_token_ids, load_tokenizer
from kiln.runtime.tp_workers import CacheSpec, release_graphs

logger = logging.getLogger(__name__)


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


class LLMEngine:
    """Continuous-batching generation over a paged KV cache, one step at a time."""

    def __init__(self, model_dir: Path, config: EngineConfig) -> None:
        device = resolve_device(config.device)
        manifest = engine_manifest(model_dir)
        if manifest is not None:  # a `kiln build` engine: its planned options, its fingerprint, its kernels
            config = apply_engine_options(config, manifest)
            prepare_engine(model_dir, manifest, device)
        if config.tp_size is None:
            config = dataclasses.replace(config, tp_size=1)
        if config.pp_size is None:
            config = dataclasses.replace(config, pp_size=1)
        self.config = config
        self.model_dir = model_dir
        dtype = None if config.dtype == "auto" else torch_dtype(config.dtype)
        self.workers = start_other_ranks(model_dir, config, dtype, device)  # before loading: each loads its part
        workers = self.workers
        try:
            self._set_up(model_dir, dtype, workers.devices[0] if workers is not None else device)
            if workers is not None:
                workers.check()
        except BaseException:
            self.shutdown()  # a refusal or failure on rank 0 must not leave worker processes behind
            raise

    def _set_up(self, model_dir: Path, dtype: torch.dtype | None, device: torch.device) -> None:
        """Load the model, size and allocate the KV cache, pick the attention backend, capture graphs."""
        config = self.config
        self.model, self.model_config = load_model(
            model_dir, dtype=dtype, device=device, dummy_weights=config.dummy_weights
        )
        has_tokenizer = any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        self.tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
        self.eos_token_ids = tuple(eos_token_ids(model_dir, self.tokenizer))
        self.kv_cache_dtype = resolve_kv_cache_dtype(
            config.kv_cache_dtype,
            self.runner_dtype,
            has_kv_scales=any(layer.calibrated_kv_scales() for layer in self._attention_layers()),
        )
        self.limits = self._resolve_limits(device)
        self.kv_cache = KVCacheManager(self.limits.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        backend = select_attention_backend(
            config.attention_backend,
            self.model_config.head_dim,
            self.runner_dtype,
            config.block_size,
            device,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        self.limits = EngineLimits(**{**self.limits.__dict__, "attention_backend": backend.name})
        workers = self.workers
        runner_class = workers.runner_class() if workers is not None else ModelRunner
        self.runner = runner_class(
            self.model,
            self.model_config,
            self.kv_cache,
            self.limits.num_kv_blocks,
            config.block_size,
            backend,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        if workers is not None:
            workers.broadcast(
                CacheSpec(self.limits.num_kv_blocks, config.block_size, self.kv_cache_dtype, backend.name)
            )
            self.runner.broadcast = workers.broadcast
        if config.enable_cuda_graphs and backend.name == "triton":
            self.runner.decode_graphs = self._capture_decode_graphs(device)
        self.scheduler = Scheduler(self.kv_cache, self.limits.max_batch_size, self.limits.max_num_tokens)
        self.groups: dict[str, RequestGroup] = {}
        self._group_by_sample: dict[str, RequestGroup] = {}
        self._seed_stream = random.Random(config.seed)  # seeds for requests that bring none: reproducible runs
        self._ids = itertools.count()

    @property
    def runner_dtype(self) -> torch.dtype:
        """The dtype the weights and KV cache use."""
        return next(self.model.parameters()).dtype

    def shutdown(self) -> None:
        """Stop tensor-parallel workers or pipeline stages (nothing to do without them)."""
        if self.workers is None:
            return
        if getattr(self, "runner", None) is not None:
            release_graphs(self.runner)  # NCCL closes a communicator only once no graph holds its kernels
        self.workers.shutdown()
        self.workers = None

    def _attention_layers(self) -> list[Attention]:
        return [module for module in self.model.modules() if isinstance(module, Attention)]

    def _capture_decode_graphs(self, device: torch.device) -> DecodeGraphs:
        limits = self.limits
        spec = DecodeGraphSpec(
            tuple(self.config.cuda_graph_batch_sizes or default_bucket_sizes(limits.max_batch_size)),
            max_blocks_per_seq=-(-limits.max_seq_len // limits.block_size),
            capture_seq_len=limits.max_seq_len,
        )
        if self.workers is not None:
            self.workers.broadcast(spec)  # every rank captures at once: the graphs hold collectives
        graphs = capture_decode_graphs(self.model, spec, device)
        self.limits = EngineLimits(**{**limits.__dict__, "cuda_graph_batch_sizes": tuple(graphs.bucket_sizes)})
        return graphs

    def _resolve_limits(self, device: torch.device) -> EngineLimits:
        config, model_config = self.config, self.model_config
        max_seq_len = config.max_seq_len or model_config.max_position_embeddings
        if max_seq_len > model_config.max_position_embeddings:
            raise UserInputError(
                f"max_seq_len={max_seq_len} exceeds the model's context of "
                f"{model_config.max_position_embeddings} tokens"
            )
        max_batch_size = config.max_batch_size or (256 if device.type == "cuda" else 32)
        max_num_tokens = config.max_num_tokens or (8192 if device.type == "cuda" else 2048)
        num_kv_blocks = config.num_kv_blocks or self._plan_kv_blocks(
            KVCachePlan(
                config.block_size,
                max_seq_len,
                max_batch_size,
                max_num_tokens,
                config.kv_cache_memory_fraction,
                self.kv_cache_dtype,
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
            dtype=str(self.runner_dtype).removeprefix("torch."),
            kv_cache_dtype=str(self.kv_cache_dtype).removeprefix("torch."),
        )

    def _plan_kv_blocks(self, plan: KVCachePlan, device: torch.device) -> int:
        """KV blocks for this rank's layers and heads; with other ranks, the smallest any of them can hold."""
        if self.workers is not None:
            self.workers.broadcast(plan)  # they plan alongside: the GPU warm-up forward has collectives
        return plan_rank_kv_blocks(self.model, self.model_config, device, plan)

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> str:
        """Queue a prompt; refuses it up front if it cannot fit max_seq_len or the vocabulary."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise UserInputError(f"request id {request_id!r} is already in use")
        self._validate(prompt_token_ids, params)
        sample_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        samples = [self._new_sample(sample_id, i, prompt_token_ids, params) for i, sample_id in enumerate(sample_ids)]
        group = RequestGroup(request_id, prompt, prompt_token_ids, params, samples, self.tokenizer)
        self.groups[request_id] = group
        self._group_by_sample.update({sample.request_id: group for sample in samples})
        self.scheduler.add(samples[0])  # siblings join once the first has computed the shared prompt
        return request_id

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise UserInputError("the prompt is empty; give at least one token")
        vocab_size = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
            raise UserInputError(f"prompt token ids must be in [0, {vocab_size}) for this model")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.limits.max_seq_len:
            raise UserInputError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"max_seq_len={self.limits.max_seq_len}; shorten the prompt or lower max_tokens"
            )

    def _new_sample(self, sample_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        seed = params.seed + index if params.seed is not None else self._seed_stream.getrandbits(63)
        return Request(sample_id, list(prompt_token_ids), params, self.eos_token_ids, seed)

    @property
    def has_unfinished(self) -> bool:
        """Whether any request is still waiting or running."""
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        """One step: schedule, run the model, update; returns outputs of the requests that advanced."""
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            if self.scheduler.has_unfinished:
                raise RuntimeError("scheduler made no progress although requests are waiting")
            return []
        try:
            result = self.runner.execute(scheduled)
        finally:
            if self.workers is not None:
                self.workers.check()  # a worker that died during the step: its error, not the step's garbage
        changed = self.scheduler.update(scheduled, result.sampled)
        now = time.monotonic()
        touched: dict[str, RequestGroup] = {}
        for request_id, entries in result.prompt_logprobs.items():
            self._group_of(request_id).samples_by_id[request_id].prompt_logprobs.extend(entries)
        for request in changed:
            group = self._group_of(request.request_id)
            if request.request_id in result.logprobs:
                request.logprobs.append(result.logprobs[request.request_id])
            stop_string = group.on_token(request)
            if stop_string is not None:
                self.scheduler.finish(request, "stop", now, stop_reason=stop_string)
            touched[group.request_id] = group
        for chunk in scheduled.chunks:  # the shared prompt is computed: let the other samples in
            group = self._group_of(chunk.request.request_id)
            for sibling in group.release_siblings(chunk.request):
                self.scheduler.add(sibling, front=True)
        outputs = [group.output() for group in touched.values()]
        for output in outputs:
            if output.finished:
                self._forget(output.request_id)
        return outputs

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (unknown or finished ids are ignored)."""
        group = self.groups.get(request_id)
        if group is None:
            return
        for request in group.samples:
            self.scheduler.finish(request, "abort")
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        group = self.groups.pop(request_id)
        for sample in group.samples:
            self._group_by_sample.pop(sample.request_id, None)

    def _group_of(self, sample_id: str) -> RequestGroup:
        return self._group_by_sample[sample_id]
