"""Random weights made on the device, for benchmarks without checkpoints (`--dummy-weights`).

Unquantized parameters get N(0, 0.02) (norms 1), a freshly initialised model's scale. Quantized
layers get tensors in the layout their kernels read, with the same effective scale: FP8 weights are
N(0, 1) in E4M3 with weight scale 0.02 (input scale 0.02: activations up to +-9), INT4 weights are
uniform nibbles with group scales 0.004 (the nibbles' spread of ~4.6 times that is ~0.02), FP8 KV
scales are 1. Only the speed of such a model means anything, not its text.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.models.quantized_linear import Fp8Linear, Int4Linear

INT4_MAX_GROUP = 128


@torch.inference_mode()
def random_weights(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Materialise every (meta) parameter of `model` on `device`."""
    generator = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            _fp8(module, device, generator)
        elif isinstance(module, Int4Linear):
            _int4(module, device, generator)
    for name, param in list(model.named_parameters()):
        if not param.is_meta or getattr(param, "optional", False):
            continue  # made above, or an optional tensor a real checkpoint may also lack
        module_name, _, attr = name.rpartition(".")
        if attr in ("k_scale", "v_scale"):
            tensor = torch.ones((), dtype=torch.float32, device=device)
        elif "norm" in name:
            tensor = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            tensor = torch.empty(param.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(tensor, requires_grad=False))


def _fp8(layer: Fp8Linear, device: torch.device, generator: torch.Generator) -> None:
    shape = (layer.output_size, layer.input_size)
    weight = torch.randn(shape, device=device, generator=generator).clamp(-448, 448).to(torch.float8_e4m3fn)
    _set(layer, "weight", weight)
    _set(layer, "weight_scale", torch.full(tuple(layer.weight_scale.shape), 0.02, device=device))
    _set(layer, "input_scale", torch.full(tuple(layer.input_scale.shape), 0.02, device=device))


def _int4(layer: Int4Linear, device: torch.device, generator: torch.Generator) -> None:
    group = INT4_MAX_GROUP
    while layer.input_size % group:
        group //= 2
    packed = torch.randint(0, 256, (layer.output_size // 2, layer.input_size), dtype=torch.uint8, device=device,
                           generator=generator)  # fmt: skip
    _set(layer, "weight", packed)
    _set(layer, "weight_scale", torch.full((layer.output_size, layer.input_size // group), 0.004, device=device))
