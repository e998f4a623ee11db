"""`kiln build`: a checkpoint -> an engine artifact (resolved plan, runtime-layout weights, fingerprint).

The plan is made and checked before anything is loaded. The weights are loaded on the CPU with our
loader (so any machine builds, and the same input gives the same bytes), written in the runtime
layout (one file per tensor-parallel rank: build/rank_weights.py), and the engine's manifest
records the resolved options, the memory plan and the fingerprint. Built on a GPU of the target's
architecture, the engine is then started once with the Triton cache pointed into it, so its
compiled kernels travel with it.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.build.planner import MemoryPlan, PlanRequest, plan_memory
from kiln.build.rank_weights import write_rank_weights
from kiln.core.artifact import Artifact, ArtifactWriter, check_output_dir, load_artifact, parent_ref_for
from kiln.core.dtypes import canonical_dtype_name, cpu_has_fast_half_precision, torch_dtype
from kiln.core.errors import UserInputError
from kiln.core.fingerprint import make_fingerprint
from kiln.core.gpu_targets import GpuTarget, current_device_target, resolve_target
from kiln.core.hf_checkpoint import read_config_json
from kiln.models.config import ModelConfig
from kiln.models.quant_config import QuantConfig

logger = logging.getLogger(__name__)

KERNEL_CACHE_DIR = "kernel_cache"
KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8")
# Files of the checkpoint an engine does not take over (its weights are rewritten; the manifest is new).
_NOT_COPIED_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt")
_NOT_COPIED_NAMES = ("manifest.yaml", "hf_quant_config.json")


@dataclass(frozen=True)
class BuildSpec:
    """Options of `kiln build` (None = the default for the target); the manifest stores the resolved ones."""

    source: Path
    output: Path | None
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    kv_cache_dtype: str = "auto"
    kv_block_size: int = 16
    kv_cache_memory_fraction: float = 0.9
    tp_size: int = 1
    pp_size: int = 1
    target_gpu: str = "auto"
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    dry_run: bool = False
    force: bool = False
    dummy_weights: bool = False  # random weights from the source's config.json (benchmark engines)


@dataclass(frozen=True)
class BuildPlan:
    """Everything decided before the build runs: the target, the resolved options and the memory plan."""

    target: GpuTarget
    request: PlanRequest
    memory: MemoryPlan
    cuda_graph_batch_sizes: tuple[int, ...]
    model: ModelConfig


def make_plan(spec: BuildSpec) -> BuildPlan:
    """Resolve the options for the target and plan memory; raises UserInputError for impossible plans."""
    hf_config = read_config_json(spec.source)
    config = ModelConfig.from_hf_config(hf_config)
    quant = QuantConfig.from_hf_config(hf_config)
    target = resolve_target(spec.target_gpu)
    if spec.kv_cache_dtype not in KV_CACHE_DTYPES:
        choices = ", ".join(KV_CACHE_DTYPES)
        raise UserInputError(f"--kv-cache-dtype must be one of {choices}, got {spec.kv_cache_dtype!r}")
    if spec.kv_block_size < 1 or spec.kv_block_size & (spec.kv_block_size - 1):
        raise UserInputError(f"--kv-block-size must be a power of two, got {spec.kv_block_size}")
    if not 0 < spec.kv_cache_memory_fraction <= 1:
        raise UserInputError(f"--kv-cache-memory-fraction must be in (0, 1], got {spec.kv_cache_memory_fraction}")
    dtype = canonical_dtype_name(config.torch_dtype or "fp32")
    if target.is_cpu and dtype != "fp32" and not cpu_has_fast_half_precision():
        dtype = "fp32"  # the CPU runtime computes in fp32 here (models/loader.py), so its KV cache is fp32
    kv_dtype = spec.kv_cache_dtype
    if kv_dtype == "auto":
        kv_dtype = "fp8" if quant is not None and quant.kv_cache_quant_algo and (target.fp8 or target.is_cpu) else dtype
    max_batch_size = spec.max_batch_size or (32 if target.is_cpu else 256)
    request = PlanRequest(
        max_batch_size=max_batch_size,
        max_num_tokens=spec.max_num_tokens or (2048 if target.is_cpu else 8192),
        max_seq_len=spec.max_seq_len or config.max_position_embeddings,
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
        block_size=spec.kv_block_size,
        kv_cache_memory_fraction=spec.kv_cache_memory_fraction,
        tp_size=spec.tp_size,
        pp_size=spec.pp_size,
    )
    for name in ("max_batch_size", "max_num_tokens", "max_seq_len"):
        if getattr(request, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be a positive integer")
    graphs = _graph_batch_sizes(spec.cuda_graph_batch_sizes, max_batch_size, target)
    return BuildPlan(target, request, plan_memory(config, quant, target, request), graphs, config)


def _graph_batch_sizes(requested: tuple[int, ...] | None, max_batch_size: int, target: GpuTarget) -> tuple[int, ...]:
    if target.is_cpu:
        return ()
    if requested is None:
        from kiln.runtime.cuda_graphs import default_bucket_sizes

        return tuple(default_bucket_sizes(max_batch_size))
    bad = [size for size in requested if not 1 <= size <= max_batch_size]
    if bad:
        raise UserInputError(f"--cuda-graph-batch-sizes {bad} must lie in [1, max-batch-size={max_batch_size}]")
    return tuple(sorted(set(requested)))


def engine_options(plan: BuildPlan) -> dict[str, Any]:
    """EngineConfig fields the engine runs with: `kiln run`, `serve` and `bench` take them as defaults."""
    request = plan.request
    options = {
        "max_batch_size": request.max_batch_size,
        "max_num_tokens": request.max_num_tokens,
        "max_seq_len": request.max_seq_len,
        "block_size": request.block_size,
        "kv_cache_dtype": request.kv_cache_dtype,
        "kv_cache_memory_fraction": request.kv_cache_memory_fraction,
        "cuda_graph_batch_sizes": list(plan.cuda_graph_batch_sizes),
        "tp_size": request.tp_size,  # not a default but a requirement: the engine has one weight file per rank
        "pp_size": request.pp_size,  # a default: every stage reads its layers from the one weight file
    }
    if plan.target.is_cpu:  # nothing to measure on the CPU: the plan's block count is the cache
        options["num_kv_blocks"] = plan.memory.num_kv_blocks
    return options


def build(spec: BuildSpec) -> tuple[BuildPlan, Artifact | None]:
    """Plan, then (unless dry_run) write the engine; returns the plan and the published artifact."""
    plan = make_plan(spec)
    if spec.dry_run:
        return plan, None
    if spec.output is None:
        raise UserInputError("give the engine directory with -o/--output (or --dry-run to print the plan only)")
    check_output_dir(spec.output, spec.force)
    from kiln.convert.stage import model_summary

    dtype = torch_dtype(canonical_dtype_name(config_dtype(plan)))
    with ArtifactWriter(spec.output, kind="engine", force=spec.force) as writer:
        config = write_rank_weights(spec.source, writer.path, spec.tp_size, dtype, spec.dummy_weights)
        for path in sorted(Path(spec.source).iterdir()):
            if path.is_file() and not path.name.endswith(_NOT_COPIED_SUFFIXES) and path.name not in _NOT_COPIED_NAMES:
                shutil.copyfile(path, writer.path / path.name)
        extra: dict[str, Any] = {
            "plan": plan.memory.to_dict(),
            "engine_options": engine_options(plan),
            "fingerprint": make_fingerprint(plan.target),
        }
        if _can_warm_kernels(plan):
            extra["kernel_cache"] = _warm_kernel_cache(writer.path, plan)
        spec_record = {
            "stage": "build",
            **{k: v for k, v in asdict(spec).items() if k not in ("dry_run", "force", "output", "source")},
            "dummy_weights": spec.dummy_weights,
            "cuda_graph_batch_sizes": list(spec.cuda_graph_batch_sizes) if spec.cuda_graph_batch_sizes else None,
            "source": str(spec.source),
            "output": str(spec.output),
        }
        writer.commit(
            name=f"{Path(spec.source).name}-engine",
            parent=None if spec.dummy_weights else parent_ref_for(spec.source),
            spec={**spec_record, "resolved": {**asdict(plan.request), "target_gpu": plan.target.name}},
            model=model_summary(config, config_dtype(plan)),
            extra=extra,
        )
    return plan, load_artifact(spec.output, kind="engine")


def config_dtype(plan: BuildPlan) -> str:
    """The dtype the engine's unquantized weights are stored in: the checkpoint's (not the CPU's fp32)."""
    return canonical_dtype_name(plan.model.torch_dtype or "fp32")


def _can_warm_kernels(plan: BuildPlan) -> bool:
    target = plan.target
    # Warming a multi-rank engine would start all its ranks at build time (and stages run on the CPU only).
    if target.is_cpu or plan.request.tp_size > 1 or plan.request.pp_size > 1 or not torch.cuda.is_available():
        return False
    return current_device_target(torch.device("cuda")).arch == target.arch


def _warm_kernel_cache(engine_dir: Path, plan: BuildPlan) -> dict[str, Any]:
    """Start the engine once with Triton's cache inside it: every kernel it uses gets compiled there."""
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.engine_config import EngineConfig
    from kiln.runtime.warm_up import warm_up, warm_up_wanted

    cache_dir = engine_dir / KERNEL_CACHE_DIR
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    try:
        options = {**engine_options(plan), "cuda_graph_batch_sizes": plan.cuda_graph_batch_sizes}
        engine = LLMEngine(engine_dir, EngineConfig(**options, device="cuda"))
        # Its start-up ran the warm-up prompts (runtime/warm_up.py) unless KILN_WARM_UP=0 turned that off: the
        # engine's cache holds the prefill path's kernels either way.
        if not warm_up_wanted("cuda"):
            warm_up(engine)
        del engine
        torch.cuda.empty_cache()
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    return {"dir": KERNEL_CACHE_DIR, "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
