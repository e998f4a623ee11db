"""`kiln convert`: any supported source -> a checkpoint artifact in Hugging Face layout."""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from kiln.convert.source import ConversionSource, open_source
from kiln.core.artifact import Artifact, ArtifactWriter, check_output_dir, load_artifact
from kiln.core.dtypes import canonical_dtype_name, hf_dtype_string, torch_dtype
from kiln.core.errors import UnsupportedArchitectureError, UserInputError
from kiln.core.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter
from kiln.models.config import ModelConfig
from kiln.models.loader import check_tensor_coverage
from kiln.models.registry import SUPPORTED_ARCHITECTURES

logger = logging.getLogger(__name__)

DtypeChoice = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class ConvertSpec:
    """Resolved options of one conversion; stored in the manifest as `spec`."""

    source: str
    output: Path
    dtype: DtypeChoice = "auto"
    name: str | None = None
    force: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES


def convert(spec: ConvertSpec) -> Artifact:
    """Stream the source's tensors into a new checkpoint artifact at spec.output."""
    check_output_dir(spec.output, spec.force)  # refuse before reading a multi-GB source
    source = open_source(spec.source)
    hf_config = source.hf_config()
    architecture = check_architecture(hf_config)
    model_config = ModelConfig.from_hf_config(hf_config)
    dtype = canonical_dtype_name(source.source_dtype() if spec.dtype == "auto" else spec.dtype)
    name = spec.name or _default_name(spec.source)
    logger.info("converting %s (%s) to %s in %s", spec.source, architecture, spec.output, dtype)

    with ArtifactWriter(spec.output, kind="checkpoint", force=spec.force) as writer:
        weight_files, shapes = _write_weights(source, writer.path, torch_dtype(dtype), spec.max_shard_bytes)
        check_tensor_coverage(model_config, shapes)  # a checkpoint `run` could not load is never published
        hf_config["dtype"] = hf_dtype_string(dtype)
        hf_config.pop("torch_dtype", None)  # transformers 5 reads "dtype"; two spellings could disagree
        _write_json(writer.path / "config.json", hf_config)
        tokenizer_files = source.write_tokenizer(writer.path)
        if not tokenizer_files:
            logger.warning("%s has no tokenizer files: the checkpoint can run token ids only", spec.source)
        generation_config = source.generation_config()
        if generation_config is not None:
            _write_json(writer.path / "generation_config.json", generation_config)
        resolved = {"stage": "convert", **asdict(spec), "output": str(spec.output), "dtype": dtype, "name": name}
        writer.commit(
            name=name,
            parent=source.parent(),
            spec=resolved,
            model=model_summary(model_config, dtype),
            extra={"weight_files": weight_files, "num_tensors": len(shapes), "tokenizer_files": tokenizer_files},
        )
    return load_artifact(spec.output, kind="checkpoint")


def check_architecture(hf_config: dict[str, Any]) -> str:
    """The config's architecture if kiln implements it; otherwise a clear refusal listing ours."""
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "unknown")
        raise UserInputError(
            f"this checkpoint is already quantized ({method}); `kiln run` loads it as it is, "
            "and `kiln convert` only takes unquantized checkpoints"
        )
    architectures = hf_config.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not architectures:
        raise UnsupportedArchitectureError(f"config.json names no 'architectures'; kiln supports: {supported}")
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {architectures[0]} is not supported; kiln supports: {supported}"
        )
    return architectures[0]


def model_summary(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """The `model` section of a manifest: what a person wants to know at a glance."""
    return {
        "architecture": config.architecture,
        "num_parameters": config.num_parameters(),
        "dtype": dtype,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_scaling": config.rope_scaling,
    }


def _write_weights(
    source: ConversionSource, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int
) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Stream the source's tensors into shards; returns the files written and every tensor's shape."""
    shards = ShardedSafetensorsWriter(out_dir, max_shard_bytes=max_shard_bytes)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in source.iter_tensors():
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        shards.add(name, tensor)
        shapes[name] = tuple(tensor.shape)
    return shards.close(), shapes


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _default_name(source: str) -> str:
    return Path(source.removeprefix("builtin:")).stem or "model"
