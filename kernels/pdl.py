"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step.

At batch 1 a Llama-3-8B decode step is ~350 short kernels back to back. Between two of them the GPU
normally lets the first drain completely (its last blocks finish, its writes are flushed) before it
launches the second: a gap of about a microsecond each, even inside a CUDA graph. Hopper's programmatic
dependent launch starts launching the next kernel while the previous one finishes. Every kernel
launched this way begins with `wait_for_previous_kernel`:
- `griddepcontrol.wait` holds it until the kernel before it has completed and its writes are visible;
- then `griddepcontrol.launch_dependents` lets its own successor launch.
The wait comes before any read of activations and before any write. Outputs come from the caching
allocator, so this kernel's output may be memory the previous kernel is still reading. Only weights
(constant during inference) may be read before it.

Kernels not launched this way (cuBLAS, NCCL, PyTorch's own) wait for full completion as usual, so the two
kinds mix safely. KILN_DISABLE_PDL=1 launches every kernel the usual way (A/B runs). The Triton
interpreter and GPUs before Hopper never use it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL (pass it as both USE_PDL and launch_pdl)."""
    if device.type != "cuda" or os.environ.get("KILN_DISABLE_PDL") == "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """First thing in a PDL-launched kernel, before any activation read or any write (see the module doc)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
