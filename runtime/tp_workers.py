"""Tensor-parallel worker processes on one machine, driven by rank 0 (the engine's process).

Rank 0 owns scheduling. Before each forward it broadcasts the step's inputs (`StepInputs`), so every
rank runs the same forward and the same logits collectives on its own shard and its own KV cache
(the same block ids: block tables come from rank 0). Workers never decide anything, so they cannot
diverge. Collectives have a timeout: a worker that dies ends the run with an error, not a hang. Only
the wait for the next step has none (its own process group): rank 0 may idle between requests.
CPU only for now (gloo); GPUs (NCCL, CUDA graphs) are the next step of issue 9.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln.core.errors import KilnError
from kiln.models.parallel import set_tensor_parallel

if TYPE_CHECKING:
    from kiln.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Workers wait for rank 0's next step on a group of their own with this timeout: a server idles between
# requests as long as it likes. A rank 0 that dies closes its connections, which ends the wait at once.
_IDLE_TIMEOUT = timedelta(days=365)


class TensorParallelError(KilnError):
    """A tensor-parallel rank failed or stopped answering."""


@dataclass
class CacheSpec:
    """What a worker needs to allocate its share of the KV cache (rank 0 measured and decided)."""

    num_blocks: int
    block_size: int
    kv_cache_dtype: torch.dtype
    attention_backend: str


class WorkerGroup:
    """Ranks 1..N-1 as child processes; rank 0 is the calling process.

    Tensor-parallel ranks; a subclass changes the kind of parallelism through `join`, `leave` and
    `runner_class` (runtime/pipeline_workers.py: pipeline stages).
    """

    kind = "tensor-parallel"
    error: type[KilnError] = TensorParallelError

    def __init__(self, model_dir: Path, size: int, dtype: torch.dtype | None, timeout_s: float) -> None:
        self.size = size
        self._dir = tempfile.mkdtemp(prefix="kiln-tp-")
        init = f"file://{os.path.join(self._dir, 'init')}"
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(
                target=_worker_main, args=(type(self), rank, size, init, str(model_dir), dtype, timeout_s), daemon=True
            )
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=size, timeout=timedelta(seconds=timeout_s))
        self._steps = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
        self.join(0, size)

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
        """Send a step (or a CacheSpec, or None to stop) to every worker."""
        dead = [p.pid for p in self.processes if not p.is_alive()]
        if dead:
            raise self.error(f"{self.kind} worker process(es) {dead} stopped; the run cannot go on")
        try:
            dist.broadcast_object_list([item], src=0, group=self._steps)
        except RuntimeError as exc:
            raise self.error(f"a {self.kind} rank stopped answering: {exc}") from exc

    def shutdown(self) -> None:
        """Stop the workers and leave the process group."""
        try:
            if all(p.is_alive() for p in self.processes):
                dist.broadcast_object_list([None], src=0, group=self._steps)
        except RuntimeError:
            pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.leave()


def _worker_main(
    group: type[WorkerGroup], rank: int, size: int, init: str, model_dir: str, dtype, timeout_s: float
) -> None:
    """A worker: load this rank's part, then run every step rank 0 broadcasts until it sends None."""
    from kiln.kernels.attention_backends import select_attention_backend
    from kiln.models.loader import load_model

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    steps = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    group.join(rank, size)
    try:
        # A checkpoint: this rank's slices cut while loading; an engine: its own rank{rank}.safetensors only.
        model, config = load_model(Path(model_dir), dtype=dtype, device="cpu")
        spec = _receive(steps)
        if spec is None:  # rank 0 stopped before the run began (it refused the model)
            return
        backend = select_attention_backend(
            spec.attention_backend, config.head_dim, next(model.parameters()).dtype, spec.block_size,
            torch.device("cpu"), kv_cache_dtype=spec.kv_cache_dtype,
        )  # fmt: skip
        runner_class = group.runner_class()
        runner = runner_class(model, config, None, spec.num_blocks, spec.block_size, backend, spec.kv_cache_dtype)
        while (step := _receive(steps)) is not None:
            runner.run_step(step)
    except (RuntimeError, group.error) as exc:  # rank 0 (or another rank) went away: nothing left to serve
        logger.warning("%s rank %d stops: %s", group.kind, rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _receive(steps: dist.ProcessGroup) -> Any:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=steps)
    return box[0]
