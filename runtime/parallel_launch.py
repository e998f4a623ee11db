"""Starting an engine's other ranks: tensor-parallel workers or pipeline stages, spawned by kiln or by torchrun.

Kiln spawns ranks 1..N-1 on this machine itself (`--tp-size N` or `--pp-size N` in one process). Under
torchrun every rank runs the same command: rank 0 goes on as the engine, the others serve it here and
then end their process. Every rank checks the launch first, so a refusal never leaves ranks waiting for
a rank 0 that already gave up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.core.hf_checkpoint import read_config_json
from kiln.models.config import ModelConfig
from kiln.models.parallel import check_tensor_parallel_size
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.pipeline_workers import StageGroup, check_pipeline_options
from kiln.runtime.torchrun import check_torchrun_world, serve_torchrun_rank, torchrun_rank
from kiln.runtime.tp_workers import WorkerGroup


def start_other_ranks(
    model_dir: Path, config: EngineConfig, dtype: torch.dtype | None, device: torch.device
) -> WorkerGroup | None:
    """The group of the engine's other ranks (None with one rank); a torchrun rank > 0 serves and exits here."""
    pipeline = config.pp_size > 1  # stages, with config.tp_size TP ranks in each
    group_class = StageGroup if pipeline else WorkerGroup
    size = config.pp_size * config.tp_size
    if config.tp_size > 1:
        model = ModelConfig.from_hf_config(read_config_json(model_dir))
        check_tensor_parallel_size(model.num_heads, model.num_kv_heads, model.intermediate_size, config.tp_size)
    rank = torchrun_rank()
    if rank is not None:
        check_torchrun_world(config.tp_size * config.pp_size)
    if pipeline:
        check_pipeline_options(model_dir, config.pp_size, config.tp_size, device)
    if rank:  # a rank torchrun started besides rank 0: a worker until rank 0 stops, then the process ends
        serve_torchrun_rank(
            group_class, model_dir, dtype, config.tp_timeout_s, device, config.dummy_weights, config.tp_size
        )
        raise SystemExit(0)
    if size == 1:
        return None
    return group_class(model_dir, size, dtype, config.tp_timeout_s, device, config.dummy_weights, config.tp_size)
