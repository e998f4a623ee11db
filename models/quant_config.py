"""The quantization a ModelOpt checkpoint declares, and swapping our linear layers for quantized ones.

config.json `quantization_config` (quant_method "modelopt") names the algorithm per model or, for
MIXED_PRECISION, per HF module. Fused layers (qkv, gate_up) must be quantized alike. Under tensor
parallelism the quantized layers take the parallel layout of the layers they replace.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.core.errors import ConfigError
from kiln.models.layers import Attention
from kiln.models.linear import LinearBase
from kiln.models.quantized_linear import Fp8Linear, Int4Linear

SUPPORTED_QUANT_ALGOS = ("FP8", "W4A16_AWQ")


@dataclass(frozen=True)
class QuantConfig:
    """config.json `quantization_config` of a ModelOpt checkpoint (quant_method "modelopt")."""

    quant_algo: str  # FP8, W4A16_AWQ or MIXED_PRECISION
    kv_cache_quant_algo: str | None = None
    ignore: tuple[str, ...] = ()  # HF module names / patterns left unquantized
    layer_algos: dict[str, str] = field(default_factory=dict)  # MIXED_PRECISION: HF module -> algo
    group_size: int = 128  # INT4 scale group (checkpoint-wide; MIXED_PRECISION may set it per layer)
    layer_group_sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> QuantConfig | None:
        """None for an unquantized config; ConfigError for a quantization kiln cannot run."""
        qc = hf_config.get("quantization_config")
        if not qc:
            return None
        method = qc.get("quant_method")
        if method != "modelopt":
            raise ConfigError(f"config.json: quant_method {method!r} is not supported (only 'modelopt')")
        algo = qc.get("quant_algo")
        layers = qc.get("quantized_layers") or {}
        layer_algos = {name: entry.get("quant_algo") for name, entry in layers.items()}
        algos = set(layer_algos.values()) if algo == "MIXED_PRECISION" else {algo}
        unsupported = sorted(str(a) for a in algos if a not in SUPPORTED_QUANT_ALGOS)
        if unsupported:
            raise ConfigError(
                f"config.json: quant_algo {', '.join(unsupported)} is not supported; "
                f"kiln runs {', '.join(SUPPORTED_QUANT_ALGOS)}"
            )
        kv_algo = qc.get("kv_cache_quant_algo") or (qc.get("kv_cache_scheme") and "FP8")
        if kv_algo not in (None, "FP8"):
            raise ConfigError(f"config.json: kv_cache_quant_algo {kv_algo!r} is not supported (only FP8)")
        ignore = tuple(qc.get("ignore") or qc.get("exclude_modules") or ())
        group_sizes = {name: int(entry["group_size"]) for name, entry in layers.items() if entry.get("group_size")}
        return cls(algo, kv_algo, ignore, layer_algos, int(qc.get("group_size") or 128), group_sizes)

    def algos(self) -> set[str]:
        """Every algorithm some layer uses."""
        return set(self.layer_algos.values()) if self.quant_algo == "MIXED_PRECISION" else {self.quant_algo}

    def group_size_for(self, hf_module_name: str) -> int:
        """The INT4 group size of one HF linear module (read from the scales at load time; used to plan)."""
        return self.layer_group_sizes.get(hf_module_name, self.group_size)

    def algo_for(self, hf_module_name: str) -> str | None:
        """The quant algorithm of one HF linear module, or None if it stays unquantized."""
        if self.quant_algo == "MIXED_PRECISION":
            return self.layer_algos.get(hf_module_name)
        for pattern in self.ignore:
            if fnmatch.fnmatch(hf_module_name, pattern) or hf_module_name.startswith(pattern + "."):
                return None
            if hf_module_name == pattern:
                return None
        return self.quant_algo


def apply_quant_config(model: nn.Module, quant_config: QuantConfig) -> None:
    """Swap the (meta) linear layers of `model` for quantized ones, and add KV scales to attention."""
    packed = getattr(model, "packed_modules_mapping", {})
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearBase):
            algos = {quant_config.algo_for(hf) for hf in _hf_module_names(name, packed)}
            if len(algos) > 1:
                raise ConfigError(
                    f"{name}: its fused projections are quantized differently ({sorted(map(str, algos))})"
                )
            algo = algos.pop()
            if algo is not None:
                layer_class = Fp8Linear if algo == "FP8" else Int4Linear
                model.set_submodule(name, layer_class.like(module))
        elif isinstance(module, Attention) and quant_config.kv_cache_quant_algo == "FP8":
            for scale in ("k_scale", "v_scale"):
                param = nn.Parameter(torch.empty((), dtype=torch.float32, device="meta"), requires_grad=False)
                param.keep_dtype = True
                setattr(module, scale, param)


def _hf_module_names(name: str, packed: dict[str, tuple[str, Hashable]]) -> list[str]:
    """HF module names that load into our module (`...qkv_proj` -> q_proj, k_proj, v_proj)."""
    prefix, _, last = name.rpartition(".")
    sources = [part for part, (fused, _) in packed.items() if fused == last]
    return [f"{prefix}.{part}" if prefix else part for part in sources] or [name]
