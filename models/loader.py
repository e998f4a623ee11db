"""Generic weight loader: build a model on the meta device and stream safetensors into it.

The loader knows nothing about any family: the model declares `packed_modules_mapping` (HF module
name -> fused module name and shard id) and every parameter carries its own `weight_loader`.
Coverage is checked both ways: every source tensor used, every parameter (and shard) filled.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Hashable, Iterable
from pathlib import Path

import torch
from torch import nn

from kiln.core.dtypes import cpu_has_fast_half_precision, torch_dtype
from kiln.core.errors import WeightMappingError
from kiln.core.hf_checkpoint import find_weight_files, iter_safetensors, read_config_json
from kiln.models.config import ModelConfig
from kiln.models.dummy_weights import random_weights
from kiln.models.engine_weights import engine_weight_file, load_engine_weights
from kiln.models.linear import check_shape
from kiln.models.parallel import tensor_parallel
from kiln.models.pipeline import other_stage_prefixes
from kiln.models.quant_config import QuantConfig, apply_quant_config
from kiln.models.registry import get_model_class

logger = logging.getLogger(__name__)

# Buffers some older checkpoints saved although they are computed, never loaded.
_COMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_NAMES_IN_ERROR = 10


def load_model(
    checkpoint_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    dummy_weights: bool = False,
) -> tuple[nn.Module, ModelConfig]:
    """Build the checkpoint's model on the meta device and load its safetensors weights onto `device`.

    dummy_weights: random weights made on `device` instead (config.json is all that is read), for benchmarks.
    """
    checkpoint_dir = Path(checkpoint_dir)
    hf_config = read_config_json(checkpoint_dir)
    archs = hf_config.get("architectures") if isinstance(hf_config, dict) else None
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        get_model_class(archs[0])  # an unsupported architecture is reported before its fields
    config = ModelConfig.from_hf_config(hf_config)
    model_class = get_model_class(config.architecture)
    device = torch.device(device)
    if dtype is None:
        dtype = torch_dtype(config.torch_dtype) if config.torch_dtype else torch.float32
        if device.type == "cpu" and dtype != torch.float32 and not cpu_has_fast_half_precision():
            logger.info("computing in fp32: this CPU has no native %s matmul (the checkpoint stays as it is)", dtype)
            dtype = torch.float32
    quant_config = QuantConfig.from_hf_config(hf_config)
    with torch.device("meta"):
        model = model_class(config)
        if quant_config is not None:
            apply_quant_config(model, quant_config)  # ModelOpt checkpoint: quantized linear layers
    tp = tensor_parallel()
    engine_weights = None if dummy_weights else engine_weight_file(checkpoint_dir, tp.rank, tp.size)
    if dummy_weights:
        random_weights(model, dtype, device)
    elif engine_weights is not None:  # a `kiln build` engine: this rank's tensors, already in the runtime layout
        load_engine_weights(model, engine_weights, dtype, device)
    else:
        load_weights(model, iter_safetensors(find_weight_files(checkpoint_dir)), dtype, device)
    _move_buffers(model, device)
    logger.info("loaded %s (%s) from %s onto %s", config.architecture, dtype, checkpoint_dir, device)
    return model.eval(), config


def check_tensor_coverage(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise WeightMappingError unless tensors of these names and shapes load into the model exactly.

    Runs the real loader on the meta device: no memory, and the same rules as loading for real.
    """
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    tensors = ((name, torch.empty(shape, device="meta")) for name, shape in shapes.items())
    load_weights(model, tensors, dtype=None, device="meta")


def load_weights(
    model: nn.Module,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> None:
    """Load HF-named tensors into `model`, raising WeightMappingError unless they match one-to-one.

    A pipeline stage loads only what it holds: tensors of modules held by other stages are skipped, and
    coverage is checked for the stage's own parameters (every stage checks its part, so all are covered).
    """
    device = torch.device(device)
    other_stages = other_stage_prefixes(model)
    packed = getattr(model, "packed_modules_mapping", {})
    skip = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        skip.add("lm_head.weight")  # the tied lm_head reuses the embedding table
    renamed = getattr(model, "renamed_suffixes", {})
    # Expected shards per parameter: the fused ones list theirs, the others take one whole tensor.
    # Optional ones (an AWQ pre_quant_scale) may be absent; their module drops them after loading.
    expected = {
        name: set(getattr(param, "shard_ids", (None,)))
        for name, param in model.named_parameters()
        if not getattr(param, "optional", False)
    }
    optional = {name for name, param in model.named_parameters() if getattr(param, "optional", False)}
    filled: dict[str, set[Hashable]] = defaultdict(set)
    unused: list[str] = []
    problems: list[str] = []
    for source_name, tensor in named_tensors:
        if source_name in skip or source_name.endswith(_COMPUTED_SUFFIXES):
            continue
        target, shard_id = _target_of(_renamed(source_name, renamed), packed)
        if target.startswith(other_stages):
            continue
        if target not in expected and target not in optional:
            unused.append(source_name)
            continue
        if shard_id in filled[target]:
            problems.append(f"{source_name}: loaded twice")
            continue
        param = model.get_parameter(target)  # looked up anew: loading replaces parameters
        # Quantized tensors (fp8, packed int4) and their fp32 scales keep the checkpoint's dtype.
        cast = dtype if tensor.is_floating_point() and dtype and not getattr(param, "keep_dtype", False) else None
        converted = tensor.to(device=device, dtype=cast)
        # safetensors hands out views of the memory-mapped file: own the data, so that rewriting
        # the checkpoint later cannot change (or fault) a live model.
        tensor = converted.clone() if converted is tensor else converted
        weight_loader = getattr(param, "weight_loader", None) or _assigning_loader(model, target)
        try:
            weight_loader(param, tensor, shard_id)
        except WeightMappingError as exc:
            problems.append(f"{source_name}: {exc}")
        filled[target].add(shard_id)  # seen (a bad one is reported once, as bad, not also as missing)
    missing = [
        _source_name(name, shard_id, packed)
        for name, shard_ids in expected.items()
        for shard_id in sorted(shard_ids - filled[name], key=str)
    ]
    _raise_if_mismatched(unused, missing, problems)
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def _renamed(source_name: str, renamed: dict[str, str]) -> str:
    """Apply the model's suffix renames (a ModelOpt `k_proj.k_scale` belongs to `attn.k_scale`)."""
    for suffix, replacement in renamed.items():
        if source_name.endswith("." + suffix):
            return source_name[: -len(suffix)] + replacement
    return source_name


def _assigning_loader(model: nn.Module, target: str):
    """A weight_loader for a parameter that declares none: replace it by the loaded tensor."""
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name)

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        if shard_id is not None:
            raise WeightMappingError(f"{target} is not a fused parameter")
        check_shape(loaded.shape, param.shape)
        setattr(module, attr, nn.Parameter(loaded, requires_grad=False))

    return load


def _target_of(source_name: str, packed: dict[str, tuple[str, Hashable]]) -> tuple[str, Hashable | None]:
    """Our parameter name and shard id for an HF tensor name (q_proj -> qkv_proj, "q")."""
    parts = source_name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard_id = packed[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard_id
    return source_name, None


def _source_name(target: str, shard_id: Hashable | None, packed: dict[str, tuple[str, Hashable]]) -> str:
    """The HF tensor name that fills one shard of our parameter (inverse of `_target_of`)."""
    if shard_id is None:
        return target
    for source_part, (fused, sid) in packed.items():
        if sid == shard_id and f".{fused}." in f".{target}.":
            return f".{target}.".replace(f".{fused}.", f".{source_part}.").strip(".")
    return f"{target}[{shard_id!r}]"


def _raise_if_mismatched(unused: list[str], missing: list[str], problems: list[str]) -> None:
    if not (unused or missing or problems):
        return
    parts = []
    if missing:
        parts.append(f"missing tensors: {_names(missing)}")
    if unused:
        parts.append(f"unknown tensors (no parameter takes them): {_names(unused)}")
    if problems:
        parts.append(f"bad tensors: {_names(problems)}")
    raise WeightMappingError(
        "checkpoint does not match the model; "
        + "; ".join(parts)
        + ". Check that config.json belongs to these weights."
    )


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES_IN_ERROR])
    more = len(items) - _MAX_NAMES_IN_ERROR
    return shown + (f" and {more} more" if more > 0 else "")


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """Move computed (non-loaded) buffers, such as rotary tables, onto the model's device."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != device:
                module._buffers[name] = buf.to(device)
