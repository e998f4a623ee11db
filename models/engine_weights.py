"""Engine weight files: the model's parameters in the runtime layout, one safetensors file per rank.

Writing takes the state dict of a model our loader built (q/k/v and gate/up already fused, quantized
tensors in the layout the kernels read), so loading an engine is a name-for-name assignment from a
memory-mapped file: no renaming, fusing or re-quantizing. Tensors are written in sorted name order
with fixed metadata, so the same checkpoint gives byte-identical files on any machine.

An engine built for N tensor-parallel ranks holds N files, each that rank's shards as its model holds
them after loading; rank r reads `rank{r}.safetensors` only, and only when it runs as rank r of N.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kiln.core.errors import ArtifactError, UserInputError, WeightMappingError
from kiln.core.manifest import MANIFEST_NAME, Manifest, parse_manifest
from kiln.models.pipeline import other_stage_prefixes

ENGINE_FORMAT = "kiln-runtime-v1"  # safetensors metadata "format": the layout of the names below


def rank_file_name(rank: int) -> str:
    """The weight file of one tensor-parallel rank."""
    return f"rank{rank}.safetensors"


def engine_tp_size(manifest: Manifest) -> int:
    """The tensor-parallel size an engine was built for (engines from before per-rank files: 1)."""
    return int((manifest.extra.get("engine_options") or {}).get("tp_size", 1))


def check_engine_tp_size(built: int, asked: int) -> None:
    """Refuse to run an engine with another tensor-parallel size than it was built for."""
    if built != asked:
        raise UserInputError(
            f"this engine was built for tp_size={built} (one weight file per rank) but tp_size={asked} was asked: "
            f"run it with --tp-size {built} (LLM(..., tp_size={built})), or rebuild it with "
            f"`kiln build ... --tp-size {asked}`"
        )


def engine_weight_file(model_dir: Path, rank: int, tp_size: int) -> Path | None:
    """The one file rank `rank` of `tp_size` loads from an engine; None for a directory that is no engine."""
    if not any((model_dir / rank_file_name(r)).is_file() for r in (0, rank)):
        return None
    manifest_path = model_dir / MANIFEST_NAME
    if manifest_path.is_file():  # read directly: the loader of one rank need not look at the others' files
        check_engine_tp_size(engine_tp_size(parse_manifest(manifest_path.read_text(), str(manifest_path))), tp_size)
    path = model_dir / rank_file_name(rank)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the engine is damaged, rebuild or re-copy it")
    return path


def write_engine_weights(model: nn.Module, out_dir: Path, rank: int = 0) -> Path:
    """Save `model`'s parameters (tied ones once) as the rank's weight file; returns its path."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in sorted(model.named_parameters(remove_duplicate=False)):
        if id(param) in seen:
            continue  # a tied parameter (lm_head sharing the embedding) is stored once
        seen.add(id(param))
        tensors[name] = param.detach().to("cpu").contiguous()
    path = out_dir / rank_file_name(rank)
    # One metadata key: safetensors writes a map's keys in hash order, which would vary between runs.
    save_file(tensors, path, metadata={"format": ENGINE_FORMAT})
    return path


def load_engine_weights(model: nn.Module, path: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Assign every tensor of an engine weight file to the parameter of the same name (built on meta).

    A pipeline stage takes only the tensors of the modules it holds.
    """
    other_stages = other_stage_prefixes(model)
    expected = {name for name, param in model.named_parameters() if not getattr(param, "optional", False)}
    optional = {name for name, param in model.named_parameters() if getattr(param, "optional", False)}
    unknown = []
    with safe_open(path, framework="pt", device="cpu") as weights:
        if (weights.metadata() or {}).get("format") != ENGINE_FORMAT:
            raise WeightMappingError(f"{path.name} is not a kiln engine weight file ({ENGINE_FORMAT})")
        for name in weights.keys():
            if name.startswith(other_stages):
                continue
            if name not in expected and name not in optional:
                unknown.append(name)
                continue
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            old = getattr(module, attr)
            tensor = weights.get_tensor(name)
            # INT4 scales are the one shape the meta model cannot know (their group size comes from the data).
            if tensor.shape != old.shape and not name.endswith("weight_scale"):
                shapes = f"{tuple(tensor.shape)}, expected {tuple(old.shape)}"
                raise WeightMappingError(f"{path.name}: {name} has shape {shapes}")
            keep_dtype = getattr(old, "keep_dtype", False) or not tensor.is_floating_point()
            tensor = tensor.to(device=device, dtype=None if keep_dtype else dtype)
            new = nn.Parameter(tensor, requires_grad=False)
            new.__dict__.update({k: v for k, v in old.__dict__.items() if k != "_is_param"})  # keep_dtype, etc.
            setattr(module, attr, new)
            expected.discard(name)
    if unknown or expected:
        raise WeightMappingError(
            f"{path.name} does not match the model: unknown tensors {sorted(unknown)[:10]}, "
            f"missing tensors {sorted(expected)[:10]}"
        )
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
