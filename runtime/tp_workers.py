"""Tensor-parallel worker processes on one machine, driven by rank 0 (the engine's process).

Rank 0 owns scheduling. Before each forward it sends the step's inputs (`StepInputs`), so every rank
runs the same forward and the same logits collectives on its own shard and its own KV cache (the
same block ids: block tables come from rank 0). Workers never decide anything, so they cannot
diverge. Steps travel through a shared-memory channel (runtime/step_channel.py; gloo only for a
message too large for it); collectives have a timeout: a worker that dies ends the run with an
error, not a hang. Waiting for the next step has none: rank 0 may idle between requests.

On the CPU every collective runs over gloo. On GPUs, rank r runs on GPU base + r and the model's
collectives run over NCCL (captured into the decode CUDA graphs like any kernel). Rank 0 also sends
the set-up that needs every rank at once: KV-cache planning (a warm-up forward has collectives in it)
and graph capture. A GPU rank blocked inside an NCCL kernel cannot see a dead peer, so on GPUs a
watchdog thread on each side turns a dead peer into an error (rank 0) or an exit (workers).
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln.core.errors import KilnError, UserInputError
from kiln.models.parallel import set_tensor_parallel
from kiln.runtime.step_channel import ChannelClosed, OversizeMessage, StepChannel

if TYPE_CHECKING:
    from kiln.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# The gloo group for messages too large for the step channel: waiting on it for the next one must not time
# out (a server idles between requests as long as it likes); a rank 0 that dies closes its connections.
_IDLE_TIMEOUT = timedelta(days=365)
_WATCH_INTERVAL_S = 0.5
_LEAVE_TIMEOUT_S = 15.0  # closing the group takes well under a second when every rank closes it


class TensorParallelError(KilnError):
    """A tensor-parallel rank failed or stopped answering."""


@dataclass
class CacheSpec:
    """What a worker needs to allocate its share of the KV cache (rank 0 measured and decided)."""

    num_blocks: int
    block_size: int
    kv_cache_dtype: torch.dtype
    attention_backend: str


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each rank: the CPU for all, or one GPU each from `device`'s index on."""
    if device.type != "cuda":
        return [device] * size
    first = device.index or 0
    available = torch.cuda.device_count()
    if first + size > available:
        raise UserInputError(
            f"{size} ranks need GPUs {first}..{first + size - 1}, but torch sees {available}: "
            "lower --tp-size/--pp-size or pick an earlier --device cuda:N"
        )
    return [torch.device("cuda", first + rank) for rank in range(size)]


def _init_group(rank: int, size: int, init: str, device: torch.device, timeout_s: float) -> dist.ProcessGroup:
    """Join the model's group (NCCL on GPUs, gloo on the CPU); returns the gloo group steps travel on."""
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init, rank=rank, world_size=size, timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size, timeout=timeout)
    return dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


class WorkerGroup:
    """Ranks 1..N-1 as child processes; rank 0 is the calling process.

    Tensor-parallel ranks; a subclass changes the kind of parallelism through `join`, `leave` and
    `runner_class` (runtime/pipeline_workers.py: pipeline stages).
    """

    kind = "tensor-parallel"
    error: type[KilnError] = TensorParallelError

    def __init__(
        self,
        model_dir: Path,
        size: int,
        dtype: torch.dtype | None,
        timeout_s: float,
        device: torch.device,
        dummy_weights: bool = False,
    ) -> None:
        self.size = size
        self.devices = rank_devices(device, size)
        self.failure: str | None = None  # set by the watchdog when a worker died
        self._in_step = False
        self._closing = threading.Event()
        self.timeout_s = timeout_s
        self._dir = tempfile.mkdtemp(prefix="kiln-tp-")
        init = f"file://{os.path.join(self._dir, 'init')}"
        self._channel = StepChannel.create(size - 1)
        channel = (self._channel.path, self._channel.capacity)
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(
                target=_worker_main,
                args=(type(self), rank, size, init, channel, str(model_dir), dtype, timeout_s, str(self.devices[rank]))
                + (dummy_weights,),
                daemon=True,
            )
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        self._steps = _init_group(0, size, init, self.devices[0], timeout_s)
        self.join(0, size)
        if self.devices[0].type == "cuda":
            threading.Thread(target=self._watch_workers, name="kiln-worker-watchdog", daemon=True).start()
        atexit.register(self.shutdown)  # a script that never calls shutdown still stops its workers cleanly

    @staticmethod
    def join(rank: int, size: int) -> None:
        """Set this process's parallel state as rank `rank` of `size` (before its model is built)."""
        set_tensor_parallel(rank, size, dist.group.WORLD)

    @staticmethod
    def leave() -> None:
        """Reset this process's parallel state to a single rank."""
        set_tensor_parallel(0, 1)

    @staticmethod
    def runner_class() -> type[ModelRunner]:
        """The ModelRunner every rank of this kind runs steps with."""
        from kiln.runtime.model_runner import ModelRunner

        return ModelRunner

    def broadcast(self, item: Any) -> None:
        """Send a step (or set-up: a KVCachePlan, CacheSpec, DecodeGraphSpec) to every worker; None stops them."""
        dead = [p.pid for p in self.processes if not p.is_alive()]
        if dead or self.failure:
            raise self.error(self.failure or f"{self.kind} worker process(es) {dead} stopped; the run cannot go on")
        try:
            if not self._channel.send(item, self._workers_alive, self.timeout_s):
                dist.broadcast_object_list([item], src=0, group=self._steps)  # too large for the channel
        except (ChannelClosed, RuntimeError) as exc:
            raise self.error(f"a {self.kind} rank stopped answering: {exc}") from exc
        self._in_step = item is not None

    def _workers_alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def check(self) -> None:
        """After rank 0's part of a step or of the set-up: raise if a worker died meanwhile (collectives aborted)."""
        self._in_step = False
        if self.failure:
            raise self.error(self.failure)

    def _watch_workers(self) -> None:
        """GPU ranks: a dead worker leaves rank 0 inside an NCCL kernel that never returns; abort it instead."""
        while not self._closing.wait(_WATCH_INTERVAL_S):
            dead = [p.pid for p in self.processes if not p.is_alive()]
            if not dead:
                continue
            self.failure = f"{self.kind} worker process(es) {dead} stopped; the run cannot go on"
            logger.error("%s", self.failure)
            threading.Thread(target=_abort_collectives, daemon=True).start()
            # The abort ends the NCCL kernels rank 0 waits on; if a step is still stuck after the timeout,
            # exiting with the message beats hanging forever.
            if not self._closing.wait(self.timeout_s) and self._in_step:
                sys.stderr.write(f"kiln: {self.failure}; exiting\n")
                os._exit(1)
            return

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (once; later calls do nothing)."""
        if self._closing.is_set():
            return
        self._closing.set()
        atexit.unregister(self.shutdown)
        healthy = all(p.is_alive() for p in self.processes) and not self.failure
        try:
            if healthy:
                self._channel.send(None, self._workers_alive, self.timeout_s)
        except ChannelClosed:
            healthy = False
        # Before joining: NCCL's destroy waits for every rank's, so rank 0 and the workers destroy together.
        _leave_group(healthy, self.devices[0], self.timeout_s)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self._channel.close(unlink=True)
        self.leave()


def _leave_group(healthy: bool, device: torch.device, timeout_s: float) -> None:
    """Destroy the process group; on GPUs with a rank gone, abort it first (a destroy would wait for that rank).

    Either runs in a thread bounded by the timeout: a leave that cannot finish is logged, never a hang.
    """
    if not dist.is_initialized():
        return
    bound = min(timeout_s, _LEAVE_TIMEOUT_S)
    if device.type == "cuda" and not healthy:
        _bounded(_abort_collectives, bound)
    if not _bounded(dist.destroy_process_group, bound):
        logger.warning("the process group did not close within %.0f s; leaving it", bound)


def _bounded(action, timeout_s: float) -> bool:
    """Run `action` in a daemon thread; whether it finished within the timeout."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def _abort_collectives() -> None:
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception as exc:  # an abort that cannot run leaves the timeout to act
        logger.warning("could not abort the NCCL group: %s", exc)


def _exit_when_orphaned(parent: int) -> None:
    """GPU workers: rank 0 gone means no one will finish the collective this worker may be blocked in."""
    while os.getppid() == parent:
        threading.Event().wait(_WATCH_INTERVAL_S)
    os._exit(1)


def _worker_main(
    group: type[WorkerGroup],
    rank: int,
    size: int,
    init: str,
    channel: tuple[str, int],
    model_dir: str,
    dtype: torch.dtype | None,
    timeout_s: float,
    device: str,
    dummy_weights: bool,
) -> None:
    """A worker: load this rank's part, then run every step rank 0 broadcasts until it sends None."""
    from kiln.models.loader import load_model

    device = torch.device(device)
    parent = os.getppid()
    if device.type == "cuda":
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    gloo_steps = _init_group(rank, size, init, device, timeout_s)
    path, capacity = channel
    steps = _Inbox(StepChannel(path, size - 1, capacity, create=False), rank - 1, gloo_steps, parent)
    group.join(rank, size)
    try:
        # A checkpoint: this rank's slices cut while loading; an engine: its own rank{rank}.safetensors only.
        model, config = load_model(Path(model_dir), dtype=dtype, device=device, dummy_weights=dummy_weights)
        _serve(group, steps, model, config, device)
    except (RuntimeError, KilnError, ChannelClosed) as exc:  # rank 0 or another rank went away or refused
        logger.warning("%s rank %d stops: %s", group.kind, rank, exc)
        if device.type == "cuda":
            # Destroying an NCCL group waits for every rank, and rank 0 may be gone or busy elsewhere: exit now
            # and let the driver release this GPU; rank 0 sees the process end.
            logging.shutdown()
            os._exit(1)
    _leave_group(True, device, timeout_s)  # rank 0 sent None and destroys at the same time


def _serve(group: type[WorkerGroup], steps: _Inbox, model, config, device: torch.device) -> None:
    """Do what rank 0 sends, in its order, until it sends None: plan the cache, build the runner, capture, step."""
    from kiln.kernels.attention_backends import select_attention_backend
    from kiln.runtime.cuda_graphs import DecodeGraphSpec, capture_decode_graphs
    from kiln.runtime.kv_sizing import KVCachePlan, plan_rank_kv_blocks

    runner = None
    while (message := steps.receive()) is not None:
        if isinstance(message, KVCachePlan):
            plan_rank_kv_blocks(model, config, device, message)  # rank 0 receives the group's minimum
        elif isinstance(message, CacheSpec):
            backend = select_attention_backend(
                message.attention_backend, config.head_dim, next(model.parameters()).dtype, message.block_size,
                device, kv_cache_dtype=message.kv_cache_dtype,
            )  # fmt: skip
            runner = group.runner_class()(
                model, config, None, message.num_blocks, message.block_size, backend, message.kv_cache_dtype
            )
        elif isinstance(message, DecodeGraphSpec):
            runner.decode_graphs = capture_decode_graphs(model, message, device)
        else:
            runner.run_step(message)
    if runner is not None:
        release_graphs(runner)


def release_graphs(runner: ModelRunner) -> None:
    """Drop a runner's CUDA graphs and wait for the GPU: a captured NCCL kernel keeps its communicator open."""
    if runner.decode_graphs is not None:
        runner.decode_graphs = None
        gc.collect()
        torch.cuda.synchronize(runner.device)


class _Inbox:
    """A worker's side of rank 0's messages: the shared-memory channel, and gloo for the oversize ones."""

    def __init__(self, channel: StepChannel, reader: int, gloo_steps: dist.ProcessGroup, parent: int) -> None:
        self.channel, self.reader, self.gloo_steps, self.parent = channel, reader, gloo_steps, parent

    def receive(self) -> Any:
        """The next message (None: stop); ChannelClosed if rank 0 exited."""
        message = self.channel.receive(self.reader, alive=lambda: os.getppid() == self.parent)
        if isinstance(message, OversizeMessage):
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.gloo_steps)
            message = box[0]
        return message
