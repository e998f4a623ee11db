"""Rank 0's side of an engine's other ranks (tensor-parallel workers; pipeline stages subclass it).

Kiln spawns ranks 1..N-1 on this machine; under torchrun they are the other processes torchrun started,
on any node (runtime/torchrun.py), and steps go over gloo. What a worker does is in runtime/worker_rank.py.

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
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln.core.errors import KilnError
from kiln.models.parallel import set_tensor_parallel
from kiln.models.peer_all_reduce import open_peer_buffers
from kiln.runtime.process_group import abort_collectives, init_group, leave_group, rank_devices
from kiln.runtime.step_channel import ChannelClosed, PeerGone, StepChannel
from kiln.runtime.torchrun import TORCHRUN_INIT, torchrun_device, torchrun_rank
from kiln.runtime.worker_rank import WATCH_INTERVAL_S, CacheSpec, release_graphs, spawned_rank_main

__all__ = ["CacheSpec", "TensorParallelError", "WorkerGroup", "release_graphs"]

if TYPE_CHECKING:
    from kiln.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class TensorParallelError(KilnError):
    """A tensor-parallel rank failed or stopped answering."""


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
        tp_size: int = 1,  # TP ranks inside each pipeline stage (StageGroup); a WorkerGroup is all TP
    ) -> None:
        self.size = size
        self.failure: str | None = None  # set by the watchdog when a worker died
        self._in_step = False
        self._closing = threading.Event()
        self._closing_lock = threading.Lock()
        self.timeout_s = timeout_s
        if torchrun_rank() is not None:  # torchrun started the other ranks (any node): no processes of ours
            self.devices = [torchrun_device(device)]
            self.processes: list[multiprocessing.Process] = []
            self._channel: StepChannel | None = None
            self._steps = init_group(0, size, TORCHRUN_INIT, self.devices[0], timeout_s)
            self.join(0, size, tp_size, timeout_s)
            atexit.register(self.shutdown)
            return
        self.devices = rank_devices(device, size)
        self._dir = tempfile.mkdtemp(prefix="kiln-tp-")
        init = f"file://{os.path.join(self._dir, 'init')}"
        self._channel = StepChannel.create(size - 1)
        channel = (self._channel.path, self._channel.capacity)
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(
                target=spawned_rank_main,
                args=(type(self), rank, size, init, channel, str(model_dir), dtype, timeout_s, str(self.devices[rank]))
                + (dummy_weights, tp_size),
                daemon=True,
            )
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        self._steps = init_group(0, size, init, self.devices[0], timeout_s)
        self.join(0, size, tp_size, timeout_s)
        if self.devices[0].type == "cuda":
            threading.Thread(target=self._watch_workers, name="kiln-worker-watchdog", daemon=True).start()
        atexit.register(self.shutdown)  # a script that never calls shutdown still stops its workers cleanly

    @staticmethod
    def join(rank: int, size: int, tp_size: int = 1, timeout_s: float = 60.0) -> None:
        """Set this process's parallel state as rank `rank` of `size` (before its model is built); all ranks are
        tensor-parallel here, so `tp_size` (the TP ranks of a pipeline stage) is not used. GPUs of one machine
        also open the peer buffers that sum the layers' outputs at decode sizes (collective: every rank joins);
        their kernel waits for a peer at most `timeout_s`, as the NCCL collectives do."""
        group = dist.group.WORLD
        set_tensor_parallel(rank, size, group, open_peer_buffers(group, timeout_s) if size > 1 else None)

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
        dead = self._dead_pids()
        if dead or self.failure:
            raise self.error(self.failure or f"{self.kind} worker process(es) {dead} stopped; the run cannot go on")
        try:
            self._send(item)
        except PeerGone as exc:
            # A killed worker's end of the channel closes before its process is reaped (a process with a CUDA
            # context, and peer memory another rank maps, can take seconds to die), so _dead_pids may not know yet.
            raise self.error(f"{self.kind} worker process(es) stopped; the run cannot go on ({exc})") from exc
        except (ChannelClosed, RuntimeError) as exc:
            raise self.error(f"a {self.kind} rank stopped answering: {exc}") from exc
        self._in_step = item is not None

    def _send(self, item: Any) -> None:
        if self._channel is None or not self._channel.send(item, self._workers_alive, self.timeout_s):
            dist.broadcast_object_list([item], src=0, group=self._steps)  # no channel, or too large for it

    def _dead_pids(self) -> list[int]:
        return [p.pid for p in self.processes if not p.is_alive()]

    def _workers_alive(self) -> bool:
        return not self._dead_pids()

    def check(self) -> None:
        """After rank 0's part of a step or of the set-up: raise if a worker died meanwhile (collectives aborted)."""
        self._in_step = False
        if self.failure:
            raise self.error(self.failure)

    def _watch_workers(self) -> None:
        """GPU ranks: a dead worker leaves rank 0 inside an NCCL kernel that never returns; abort it instead."""
        while not self._closing.wait(WATCH_INTERVAL_S):
            dead = self._dead_pids()
            if not dead:
                continue
            with self._closing_lock:
                if self._closing.is_set():
                    return  # the workers exit because shutdown told them to: nothing to abort
                self.failure = f"{self.kind} worker process(es) {dead} stopped; the run cannot go on"
                logger.error("%s", self.failure)
                threading.Thread(target=abort_collectives, daemon=True).start()
            # The abort ends the NCCL kernels rank 0 waits on; if a step is still stuck after the timeout,
            # exiting with the message beats hanging forever.
            if not self._closing.wait(self.timeout_s) and self._in_step:
                sys.stderr.write(f"kiln: {self.failure}; exiting\n")
                os._exit(1)
            return

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (once; later calls do nothing)."""
        with self._closing_lock:  # the watchdog must not take the workers' exit for a death
            if self._closing.is_set():
                return
            self._closing.set()
        atexit.unregister(self.shutdown)
        healthy = self._workers_alive() and not self.failure
        try:
            if healthy:
                self._send(None)
        except (ChannelClosed, RuntimeError):
            healthy = False
        # Before joining: NCCL's destroy waits for every rank's, so rank 0 and the workers destroy together.
        leave_group(healthy, self.devices[0], self.timeout_s)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if self._channel is not None:
            self._channel.close(unlink=True)
        self.leave()
