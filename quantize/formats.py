"""The quantization formats `kiln quantize` offers, and what each one means (no modelopt import here)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.core.errors import UserInputError


@dataclass(frozen=True)
class QuantFormat:
    """One offered format: its ModelOpt algorithm, whether it calibrates, and its default quality gate."""

    name: str
    quant_algo: str  # the `quant_algo` ModelOpt writes into hf_quant_config.json
    weight_bits: int
    activation_bits: int  # 16: weight-only (activations stay bf16/fp16)
    group_size: int | None  # default block size along the input dim; None for per-tensor scales
    needs_calibration: bool  # False: weights only, no forward passes over calibration data
    max_ppl_increase_pct: float  # default quality gate (perplexity increase against the parent)
    description: str


FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat(
        name="fp8",
        quant_algo="FP8",
        weight_bits=8,
        activation_bits=8,
        group_size=None,
        needs_calibration=True,
        max_ppl_increase_pct=3.0,
        description="FP8 E4M3 weights and static activation scales, per tensor (W8A8)",
    ),
    "int4-awq": QuantFormat(
        name="int4-awq",
        quant_algo="W4A16_AWQ",
        weight_bits=4,
        activation_bits=16,
        group_size=128,
        needs_calibration=True,
        max_ppl_increase_pct=15.0,
        description="INT4 weights in groups along the input dim, AWQ-calibrated (W4A16)",
    ),
    "int4-wo": QuantFormat(
        name="int4-wo",
        # ModelOpt exports every 4-bit blockwise weight-only model as W4A16_AWQ; without AWQ
        # calibration there are simply no pre_quant_scale tensors.
        quant_algo="W4A16_AWQ",
        weight_bits=4,
        activation_bits=16,
        group_size=128,
        needs_calibration=False,
        max_ppl_increase_pct=15.0,
        description="INT4 weights in groups along the input dim, round-to-nearest, no calibration (W4A16)",
    ),
}

KV_CACHE_DTYPES = ("fp8",)


def get_format(name: str) -> QuantFormat:
    """The format called `name`; raises UserInputError listing the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UserInputError(f"unknown quantization format {name!r}; choose one of {', '.join(FORMATS)}") from None
