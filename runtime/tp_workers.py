"""Tensor-parallel worker processes on one machine, driven by rank 0 (the engine's process).

Rank 0 owns scheduling. Before each forward it broadcasts the step's inputs (`StepInputs`), so every
rank runs the same forward and the same logits collectives on its own shard and its own KV cache
(the same block ids: block tables come from rank 0). Workers never decide anything, so they cannot
diverge. Collectives have a timeout: a worker that dies ends the run with an error, not a hang.
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
from typing import Any

import torch
import torch.distributed as dist

from kiln.core.errors import KilnError
from kiln.models.parallel import set_tensor_parallel

logger = logging.getLogger(__name__)


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
    """Ranks 1..N-1 as child processes; rank 0 is the calling process."""

    def __init__(self, model_dir: Path, size: int, dtype: torch.dtype | None, timeout_s: float) -> None:
        self.size = size
        self._dir = tempfile.mkdtemp(prefix="kiln-tp-")
        init = f"file://{os.path.join(self._dir, 'init')}"
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=_worker_main, args=(rank, size, init, str(model_dir), dtype, timeout_s), daemon=True)
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=size, timeout=timedelta(seconds=timeout_s))
        set_tensor_parallel(0, size, dist.group.WORLD)

    def broadcast(self, item: Any) -> None:
        """Send a step (or a CacheSpec, or None to stop) to every worker."""
        dead = [p.pid for p in self.processes if not p.is_alive()]
        if dead:
            raise TensorParallelError(f"tensor-parallel worker process(es) {dead} stopped; the run cannot go on")
        try:
            dist.broadcast_object_list([item], src=0)
        except RuntimeError as exc:
            raise TensorParallelError(f"a tensor-parallel rank stopped answering: {exc}") from exc

    def shutdown(self) -> None:
        """Stop the workers and leave the process group."""
        try:
            if all(p.is_alive() for p in self.processes):
                dist.broadcast_object_list([None], src=0)
        except RuntimeError:
            pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        set_tensor_parallel(0, 1)


def _worker_main(rank: int, size: int, init: str, model_dir: str, dtype, timeout_s: float) -> None:
    """A worker: load this rank's shard, then run every step rank 0 broadcasts until it sends None."""
    from kiln.kernels.attention_backends import select_attention_backend
    from kiln.models.loader import load_model
    from kiln.runtime.model_runner import ModelRunner

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    set_tensor_parallel(rank, size, dist.group.WORLD)
    try:
        # A checkpoint: this rank's slices cut while loading; an engine: its own rank{rank}.safetensors only.
        model, config = load_model(Path(model_dir), dtype=dtype, device="cpu")
        spec = _receive()
        backend = select_attention_backend(
            spec.attention_backend, config.head_dim, next(model.parameters()).dtype, spec.block_size,
            torch.device("cpu"), kv_cache_dtype=spec.kv_cache_dtype,
        )  # fmt: skip
        runner = ModelRunner(model, config, None, spec.num_blocks, spec.block_size, backend, spec.kv_cache_dtype)
        while (step := _receive()) is not None:
            runner.run_step(step)
    except RuntimeError as exc:  # rank 0 went away: nothing left to serve
        logger.warning("tensor-parallel rank %d stops: %s", rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _receive() -> Any:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
