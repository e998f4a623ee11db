"""The GPUs an engine can be built for: architecture, memory and FP8 support, with or without that GPU here.

`kiln build --target-gpu NAME` plans for a named card, so a CI machine without a GPU can build the
engine a GPU machine will run. Memory is what torch reports as `total_memory` for the card (a little
under the marketing figure). `auto` describes the GPU of this machine (or the CPU when there is none).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from kiln.core.errors import UserInputError

GIB = 2**30


@dataclass(frozen=True)
class GpuTarget:
    """What the planner and the fingerprint need to know about the device an engine is built for."""

    name: str  # our short name: "h100-80gb", or "cpu"
    sku: str  # the device name torch reports
    arch: str  # "sm90"; "cpu" for the CPU
    memory_bytes: int  # device memory (for the CPU: the KV-cache budget of the CPU runtime)
    fp8: bool  # FP8 tensor cores (compute capability 8.9+)

    @property
    def is_cpu(self) -> bool:
        """Whether the engine runs on the CPU."""
        return self.arch == "cpu"

    def to_dict(self) -> dict[str, Any]:
        """For the manifest."""
        return asdict(self)


def _gpu(name: str, sku: str, capability: tuple[int, int], memory_gib: float) -> GpuTarget:
    return GpuTarget(name, sku, f"sm{capability[0]}{capability[1]}", int(memory_gib * GIB), capability >= (8, 9))


KNOWN_TARGETS: dict[str, GpuTarget] = {
    target.name: target
    for target in (
        _gpu("h100-80gb", "NVIDIA H100 80GB HBM3", (9, 0), 79.1),
        _gpu("h100-94gb", "NVIDIA H100 NVL", (9, 0), 93.1),
        _gpu("h200", "NVIDIA H200", (9, 0), 139.8),
        _gpu("a100-80gb", "NVIDIA A100-SXM4-80GB", (8, 0), 79.2),
        _gpu("a100-40gb", "NVIDIA A100-SXM4-40GB", (8, 0), 39.4),
        _gpu("l40s", "NVIDIA L40S", (8, 9), 44.4),
        _gpu("rtx-4090", "NVIDIA GeForce RTX 4090", (8, 9), 23.6),
        # The CPU runtime caps its KV cache at 2 GiB (runtime/kv_sizing.py); it plans with that.
        GpuTarget("cpu", "cpu", "cpu", 2 * GIB, False),
    )
}


def current_device_target(device: torch.device) -> GpuTarget:
    """The target that describes `device` (a known card when its architecture and memory match one)."""
    if device.type != "cuda":
        return KNOWN_TARGETS["cpu"]
    props = torch.cuda.get_device_properties(device)
    arch = f"sm{props.major}{props.minor}"
    for target in KNOWN_TARGETS.values():
        if target.arch == arch and abs(target.memory_bytes - props.total_memory) < 0.03 * props.total_memory:
            return GpuTarget(target.name, props.name, arch, props.total_memory, target.fp8)
    slug = "".join(c if c.isalnum() else "-" for c in props.name.lower()).strip("-")
    return GpuTarget(slug, props.name, arch, props.total_memory, (props.major, props.minor) >= (8, 9))


def resolve_target(name: str) -> GpuTarget:
    """`auto` (this machine's GPU, or the CPU) or a known target name; anything else is refused."""
    if name == "auto":
        return current_device_target(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name not in KNOWN_TARGETS:
        raise UserInputError(f"unknown --target-gpu {name!r}; use auto or one of: {', '.join(KNOWN_TARGETS)}")
    return KNOWN_TARGETS[name]
