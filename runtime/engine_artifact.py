"""Starting from an engine artifact (`kiln build`): its options as defaults, its fingerprint, its kernels.

An engine fixes what it was planned for: options left at their defaults take the engine's values, and
asking for more than it was built for (a longer max_seq_len, a larger batch) is refused. Its
tensor-parallel size is fixed by its weight files (one per rank), so it must be asked for exactly. Its
fingerprint must match this device's architecture; its compiled Triton kernels are copied into
Triton's cache so the first start skips compiling them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch

from kiln.core.artifact import is_artifact, load_artifact
from kiln.core.errors import UserInputError
from kiln.core.manifest import Manifest
from kiln.models.engine_weights import check_engine_tp_size, engine_tp_size
from kiln.runtime.engine_config import EngineConfig

logger = logging.getLogger(__name__)

_UPPER_LIMITS = ("max_batch_size", "max_num_tokens", "max_seq_len")  # sizes the plan's memory was made for


def engine_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of an engine artifact, or None for checkpoints and plain model directories."""
    if not is_artifact(model_dir):
        return None
    manifest = load_artifact(model_dir).manifest
    return manifest if manifest.kind == "engine" else None


def apply_engine_options(config: EngineConfig, manifest: Manifest) -> EngineConfig:
    """`config` with the engine's options wherever it holds EngineConfig's defaults."""
    built_tp_size = engine_tp_size(manifest)  # the engine holds one weight file per rank: a requirement
    if config.tp_size is None:
        config = dataclasses.replace(config, tp_size=built_tp_size)
    check_engine_tp_size(built_tp_size, config.tp_size)  # before any worker process starts
    built = {name: value for name, value in (manifest.extra.get("engine_options") or {}).items() if name != "tp_size"}
    defaults = EngineConfig()
    changes = {}
    for name, value in built.items():
        if name == "cuda_graph_batch_sizes":
            value = tuple(value) or None
        asked = getattr(config, name)
        if asked == getattr(defaults, name):
            changes[name] = value
        elif name in _UPPER_LIMITS and asked > value:
            raise UserInputError(
                f"{name}={asked} exceeds the {value} this engine was built for; rebuild it with "
                f"`kiln build ... --{name.replace('_', '-')} {asked}`"
            )
    return dataclasses.replace(config, **changes)


def prepare_engine(model_dir: Path, manifest: Manifest, device: torch.device) -> None:
    """Refuse an engine for another architecture; hand its compiled kernels to Triton's cache."""
    from kiln.core.fingerprint import check_fingerprint

    check_fingerprint(manifest.extra.get("fingerprint") or {}, device, str(model_dir))
    kernel_cache = manifest.extra.get("kernel_cache")
    if device.type != "cuda" or not kernel_cache:
        return
    source = model_dir / kernel_cache["dir"]
    target = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for entry in source.iterdir():
        if entry.is_dir() and not (target / entry.name).exists():
            shutil.copytree(entry, target / entry.name)
            copied += 1
    logger.info("kernel cache: %d compiled kernel(s) copied from the engine into %s", copied, target)
