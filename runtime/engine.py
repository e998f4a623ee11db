"""The engine: `step = schedule -> launch -> update`, plus requests in and outputs out.

With async scheduling a step launches the next step before it reads back the tokens of the one in
flight, so the host's bookkeeping of step N (tokens, stop checks, detokenization, outputs) runs while
the GPU computes step N+1; the cost is one step computed for a request that turns out to have
stopped (its result is dropped). Requests whose sampling needs every earlier token on the host
(repetition, presence or frequency penalties) make the engine wait for each step instead.
"""

import dataclasses
import itertools
import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kiln.core.dtypes import torch_dtype
from kiln.core.errors import UserInputError
from kiln.kernels.attention_backends import select_attention_backend
from kiln.models.layers import Attention
from kiln.models.loader import load_model
from kiln.runtime.engine_artifact import apply_engine_options, engine_manifest, prepare_engine
from kiln.runtime.engine_config import EngineConfig, resolve_device, resolve_kv_cache_dtype
from kiln.runtime.engine_limits import EngineLimits, resolve_limits, validate_prompt
from kiln.runtime.gc_tuning import tune_garbage_collector
from kiln.runtime.graph_capture import capture_engine_graphs
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.kv_sizing import KVCachePlan, plan_rank_kv_blocks
from kiln.runtime.model_runner import LaunchedStep, ModelRunner
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.parallel_launch import start_other_ranks
from kiln.runtime.request import Request
from kiln.runtime.request_group import RequestGroup
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerOutput
from kiln.runtime.stall_log import SlowStepLog
from kiln.runtime.step_clock import StepClock
from kiln.runtime.tokenizer import eos_token_ids, load_tokenizer
from kiln.runtime.tp_workers import CacheSpec, release_graphs
from kiln.runtime.warm_up import warm_up, warm_up_wanted

logger = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching generation over a paged KV cache, one step at a time."""

    def __init__(self, model_dir: Path, config: EngineConfig) -> None:
        tune_garbage_collector()  # fewer collections of the objects each step makes (runtime/gc_tuning.py)
        self._stall_log = SlowStepLog()  # KILN_LOG_STALLS: slow steps and kernel compiles are logged
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
            self.runner.decode_graphs, self.runner.mixed_graphs, self.limits = capture_engine_graphs(
                self.model, self.limits, config.cuda_graph_batch_sizes, config.pp_size,
                workers.broadcast if workers is not None else None, device,
            )  # fmt: skip
        self.scheduler = Scheduler(self.kv_cache, self.limits.max_batch_size, self.limits.max_num_tokens)
        self.groups: dict[str, RequestGroup] = {}
        self._group_by_sample: dict[str, RequestGroup] = {}
        self._seed_stream = random.Random(config.seed)  # seeds for requests that bring none: reproducible runs
        self._ids = itertools.count()
        self._async_scheduling = self._resolve_async_scheduling(device)
        self._in_flight: LaunchedStep | None = None
        self._last_scheduled = SchedulerOutput()  # for KILN_LOG_STALLS
        self.clock: StepClock | None = None  # a server that paces launches sets one: launch and read-back times
        self._num_penalised_requests = 0  # their sampling reads all earlier tokens: no step may be in flight
        if warm_up_wanted(device.type):
            warm_up(self)  # the prefill path's kernels compile now, not on the first request

    def _resolve_async_scheduling(self, device: torch.device) -> bool:
        if self.config.pp_size > 1:
            return False  # the stages run micro-batches of the step rank 0 sends, tokens and all
        if self.config.async_scheduling is not None:
            return self.config.async_scheduling
        return device.type == "cuda" and os.environ.get("KILN_DISABLE_ASYNC_SCHEDULING") != "1"

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

    def _resolve_limits(self, device: torch.device) -> EngineLimits:
        return resolve_limits(
            self.config, self.model_config, device, self.runner_dtype, self.kv_cache_dtype, self._plan_kv_blocks
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
        arrival_time: float | None = None,
    ) -> str:
        """Queue a prompt; refuses it up front if it cannot fit max_seq_len or the vocabulary.

        arrival_time (time.monotonic()) is when the caller received it, for a server whose requests wait
        for the engine's thread; by default, now.
        """
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise UserInputError(f"request id {request_id!r} is already in use")
        validate_prompt(prompt_token_ids, params.max_tokens, self.model_config.vocab_size, self.limits.max_seq_len)
        sample_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        arrival = time.monotonic() if arrival_time is None else arrival_time
        samples = [
            self._new_sample(sample_id, i, prompt_token_ids, params, arrival) for i, sample_id in enumerate(sample_ids)
        ]
        group = RequestGroup(request_id, prompt, prompt_token_ids, params, samples, self.tokenizer)
        self.groups[request_id] = group
        self._num_penalised_requests += params.needs_output_tokens_on_host
        self._group_by_sample.update({sample.request_id: group for sample in samples})
        self.scheduler.add(samples[0])  # siblings join once the first has computed the shared prompt
        return request_id

    def _new_sample(
        self, sample_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float
    ) -> Request:
        seed = params.seed + index if params.seed is not None else self._seed_stream.getrandbits(63)
        return Request(sample_id, list(prompt_token_ids), params, self.eos_token_ids, seed, arrival_time=arrival_time)

    @property
    def async_scheduling(self) -> bool:
        """Whether steps are launched before the previous one is read back (see the module docstring)."""
        return self._async_scheduling

    @property
    def step_in_flight(self) -> bool:
        """Whether a launched step's tokens are still to be read back (async scheduling)."""
        return self._in_flight is not None

    @property
    def has_unfinished(self) -> bool:
        """Whether any request is still waiting or running, or a step's results are still to be read."""
        return self.scheduler.has_unfinished or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """One step: schedule, launch; returns outputs of the requests that advanced in the step it finished.

        With async scheduling that is the step launched by the previous call, read back after this call's
        launch (a first call returns nothing); otherwise the step launched now.
        """
        started = time.perf_counter()
        outputs = self._step()
        self._stall_log.after_step(started, self._last_scheduled)
        return outputs

    def _step(self) -> list[RequestOutput]:
        overlap = self._async_scheduling and self._num_penalised_requests == 0
        if self._in_flight is not None and not overlap:
            return self._finish(self._take_in_flight())
        started = time.monotonic()
        scheduled = self._last_scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            if self._in_flight is not None:  # whatever is left waits on the step in flight (e.g. its last tokens)
                return self._finish(self._take_in_flight())
            if self.scheduler.has_unfinished:
                raise RuntimeError("scheduler made no progress although requests are waiting")
            return []
        with self._worker_errors_first():
            launched = self.runner.launch(scheduled)
        clock = self.clock
        if clock is not None:
            clock.launched_at = time.monotonic()
            clock.launch_seconds = clock.launched_at - started
            clock.launched_decode_only = scheduled.num_tokens == len(scheduled.chunks)
        if not overlap:
            return self._finish(launched)
        previous, self._in_flight = self._in_flight, launched
        return self._finish(previous) if previous is not None else []

    def _take_in_flight(self) -> LaunchedStep:
        launched, self._in_flight = self._in_flight, None
        assert launched is not None
        return launched

    @contextmanager
    def _worker_errors_first(self) -> Iterator[None]:
        """A worker that died during the step: its error, not the step's garbage."""
        try:
            yield
        finally:
            if self.workers is not None:
                self.workers.check()

    def _finish(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens back, advance its requests, and make their outputs."""
        with self._worker_errors_first():
            result = self.runner.finish(launched)
        if self.clock is not None:
            self.clock.read_back_at = time.monotonic()
        changed = self.scheduler.update(launched.scheduled, result.sampled)
        now = time.monotonic()
        touched: dict[str, RequestGroup] = {}
        for request_id, entries in result.prompt_logprobs.items():
            group = self._group_by_sample.get(request_id)
            if group is not None:  # else aborted while the step ran
                group.samples_by_id[request_id].prompt_logprobs.extend(entries)
        for request in changed:
            group = self._group_of(request.request_id)
            if request.request_id in result.logprobs:
                request.logprobs.append(result.logprobs[request.request_id])
            stop_string = group.on_token(request)
            if stop_string is not None:
                self.scheduler.finish(request, "stop", now, stop_reason=stop_string)
            touched[group.request_id] = group
        for chunk in launched.scheduled.chunks:  # the shared prompt is computed: let the other samples in
            group = self._group_by_sample.get(chunk.request.request_id)
            for sibling in group.release_siblings(chunk.request) if group is not None else ():
                self.scheduler.add(sibling, front=True)
        outputs = [group.output() for group in touched.values() if group.reports_every_step or group.finished]
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
        self._num_penalised_requests -= group.params.needs_output_tokens_on_host
        for sample in group.samples:
            self._group_by_sample.pop(sample.request_id, None)

    def _group_of(self, sample_id: str) -> RequestGroup:
        return self._group_by_sample[sample_id]
