"""Pipeline-parallel stage processes on one machine, driven by stage 0 (the engine's process).

Same group mechanics as tensor parallelism (runtime/tp_workers.py): stages 1..M-1 are child processes
joined over gloo, rank 0 schedules and broadcasts each step's inputs and the KV cache's size, and every
stage runs the step; here each stage builds and loads only its decoder layers, allocates KV cache for
them alone (with rank 0's block ids) and runs its part of every micro-batch (runtime/pipeline_runner.py).
With --tp-size N too, each stage is N tensor-parallel ranks (global rank = stage x N + TP rank): the
layers' collectives run in the stage's own group, and hidden states go from each TP rank to the same
TP rank of the next stage. On GPUs the stages talk over NCCL (one GPU per rank) and replay their own
decode CUDA graphs; on the CPU over gloo.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kiln.core.errors import KilnError
from kiln.core.hf_checkpoint import read_config_json
from kiln.models.config import ModelConfig
from kiln.models.parallel import set_tensor_parallel
from kiln.models.pipeline import set_pipeline_stage, stage_layers
from kiln.runtime.tp_workers import WorkerGroup

if TYPE_CHECKING:
    from kiln.runtime.model_runner import ModelRunner


class PipelineParallelError(KilnError):
    """A pipeline stage failed or stopped answering."""


class StageGroup(WorkerGroup):
    """Stages 1..M-1 as child processes; stage 0 is the calling process."""

    kind = "pipeline-parallel"
    error = PipelineParallelError

    @staticmethod
    def join(rank: int, size: int, tp_size: int = 1, timeout_s: float = 60.0) -> None:
        """Become global rank `rank` of `size`: stage rank // tp_size, TP rank rank % tp_size within it.

        Every rank creates every stage's TP group, in stage order (torch.distributed wants all ranks to
        take part in each new_group), and keeps its own.
        """
        stage, tp_rank = divmod(rank, tp_size)
        num_stages = size // tp_size
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(num_stages)]
        set_tensor_parallel(tp_rank, tp_size, groups[stage] if tp_size > 1 else None)
        set_pipeline_stage(stage, num_stages, tp_rank, tp_size)

    @staticmethod
    def leave() -> None:
        """Back to a single stage and a single TP rank."""
        set_pipeline_stage(0, 1)
        set_tensor_parallel(0, 1)

    @staticmethod
    def runner_class() -> type[ModelRunner]:
        """Every stage runs steps with the PipelineRunner."""
        from kiln.runtime.pipeline_runner import PipelineRunner

        return PipelineRunner


def check_pipeline_options(model_dir: Path, pp_size: int, tp_size: int, device: torch.device) -> None:
    """Refuse what pipeline parallelism cannot run, before any stage process starts."""
    stage_layers(ModelConfig.from_hf_config(read_config_json(model_dir)).num_layers, 0, pp_size)  # pp <= layers
