"""An engine's fingerprint: the GPU it targets and the library versions it was built with.

Loading checks it against the machine: another GPU architecture (or a GPU engine on the CPU, or the
reverse) is refused with one sentence; differing torch, triton, CUDA or kiln versions only warn,
since the weights do not depend on them (kernel caches are then rebuilt on first use).
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import torch

from kiln.core.errors import UserInputError
from kiln.core.gpu_targets import GpuTarget, current_device_target
from kiln.core.version import __version__

logger = logging.getLogger(__name__)

VERSION_KEYS = ("torch", "triton", "cuda", "kiln")


def library_versions() -> dict[str, str | None]:
    """The versions that shape an engine's kernels (None for what is not installed)."""
    try:  # the installed version, without importing triton (a quarter second of every start)
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {"torch": str(torch.__version__), "triton": triton_version, "cuda": torch.version.cuda, "kiln": __version__}


def make_fingerprint(target: GpuTarget) -> dict[str, Any]:
    """What the manifest records under `extra.fingerprint`."""
    return {"target": target.to_dict(), "versions": library_versions()}


def check_fingerprint(fingerprint: dict[str, Any], device: torch.device, engine_name: str) -> None:
    """Refuse an engine built for another architecture than `device`'s; warn on version differences."""
    target = fingerprint.get("target") or {}
    here = current_device_target(device)
    if target.get("arch") != here.arch:
        built_for = f"{target.get('name')} ({target.get('arch')})"
        runs_on = f"{here.sku} ({here.arch})" if not here.is_cpu else "the CPU"
        raise UserInputError(
            f"engine {engine_name} was built for {built_for} and cannot run on {runs_on}; "
            f"rebuild it here with `kiln build CHECKPOINT -o ENGINE --target-gpu {'cpu' if here.is_cpu else 'auto'}`"
        )
    built_with = fingerprint.get("versions") or {}
    now = library_versions()
    differences = [
        f"{key} {built_with.get(key)} -> {now[key]}" for key in VERSION_KEYS if built_with.get(key) != now[key]
    ]
    if differences:
        logger.warning("engine %s was built with other library versions (%s)", engine_name, ", ".join(differences))
