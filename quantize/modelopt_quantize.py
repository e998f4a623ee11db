"""Offline quantization: calibrate a Hugging Face checkpoint with NVIDIA ModelOpt and export it.

`quantize_checkpoint` loads the checkpoint with transformers (fp32 on the CPU, bf16 on a GPU), runs
`mtq.quantize` with a calibration loop over token windows, casts the weights to bf16 (left in fp32,
the layers ModelOpt leaves unquantized would be exported as fp32), and writes ModelOpt's unified
Hugging Face checkpoint with `export_hf_checkpoint`: config.json with `quantization_config` (quant_method "modelopt"),
hf_quant_config.json and model.safetensors, plus the source's tokenizer files.

Layout written by modelopt 0.47 (per quantized linear `P`, e.g. `model.layers.0.self_attn.q_proj`;
lm_head and embeddings stay bf16, listed in `ignore` / `exclude_modules`):

- fp8 (quant_algo "FP8"): `P.weight` float8_e4m3fn [out, in]; `P.weight_scale` fp32 scalar
  (amax / 448; W = weight * weight_scale); `P.input_scale` fp32 scalar (static activation scale).
  q/k/v (and gate/up) share one `input_scale` (same input) but keep their own `weight_scale`.
- int4-awq / int4-wo (quant_algo "W4A16_AWQ" for both): `P.weight` uint8 [out / 2, in], two signed
  int4 values per byte packed along the *output* dim: byte[r, i] = (q[2r, i] & 0xF) | (q[2r+1, i] << 4);
  `P.weight_scale` fp32 [out, in / group] (amax / 7; W = q * scale[:, i // group]), symmetric, no zero
  point. AWQ adds `P.pre_quant_scale` bf16 [in] (y = (x * pre_quant_scale) W^T) only where it could
  not be folded into the preceding RMSNorm weight: modelopt folds it for q/k/v and gate/up, so in
  practice o_proj and down_proj carry one. int4-wo has none (hf_quant_config still says
  `"pre_quant_scale": true`).
- Different group sizes per layer make the export `quant_algo: "MIXED_PRECISION"` with a
  `quantized_layers` table ({name: {quant_algo, group_size, ...}}) in both config files.
- `kv_cache_dtype="fp8"`: `...self_attn.k_proj.k_scale` and `...v_proj.v_scale` fp32 scalars
  (post-rope K / V amax / 448) and `kv_cache_quant_algo: "FP8"`.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.core.errors import OutputExistsError, UserInputError
from kiln.quantize.formats import KV_CACHE_DTYPES, QuantFormat, get_format

logger = logging.getLogger(__name__)

MIN_GROUP_SIZE = 16
EXPORT_DTYPE = torch.bfloat16  # of the unquantized tensors (norms, embeddings, lm_head) and the quantizers' inputs
# How the int4 group scales are chosen. ModelOpt's int4-wo config takes amax / 7 per group; searching the
# scale costs seconds and measurably less quality: on SmolLM2-135M +32.0% -> +25.4% perplexity at groups
# of 32, +14.1% at groups of 16 (docs/quantize.md). int4-awq keeps ModelOpt's awq_lite; `awq_clip=True`
# adds AWQ's per-group clipping search (awq_full): +15.5% -> +13.3% at groups of 32, but ~30 min on a
# 2-core CPU for that 135M model (its search runs full-size elementwise products per candidate).
INT4_WO_SCALE_SEARCH = {"method": "mse", "start_multiplier": 0.5, "stop_multiplier": 1.1, "step_size": 0.02}
AWQ_FULL = {"method": "awq_full", "alpha_step": 0.1}
_NOT_COPIED = ("config.json", "manifest.yaml", "hf_quant_config.json")
_NOT_COPIED_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class QuantizeResult:
    """What quantize_checkpoint did: the format, the group size it chose per layer, the timing."""

    out_dir: Path
    format: str
    num_calib_windows: int
    kv_cache_dtype: str | None
    group_sizes: dict[str, int] = field(default_factory=dict)  # HF module name -> group size (int4)
    seconds: float = 0.0


def quantize_checkpoint(
    src_dir: Path,
    out_dir: Path,
    fmt: str,
    calib_windows: list[list[int]],
    group_size: int = 128,
    kv_cache_dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    awq_clip: bool = False,
) -> QuantizeResult:
    """Quantize the HF checkpoint in `src_dir` to `fmt` and write ModelOpt's HF checkpoint to `out_dir`."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    spec = get_format(fmt)
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    _check_args(spec, out_dir, calib_windows, kv_cache_dtype)
    start = time.perf_counter()
    _seed_everything(seed)
    # Calibrate in fp32 on the CPU: without bf16 units a bf16 GEMM is ~4x slower there (AWQ's searches
    # spent most of their time in them); the weights go to bf16 before export either way.
    calib_dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=calib_dtype).to(device).eval()
    group_sizes = choose_group_sizes(model, group_size) if spec.weight_bits == 4 else {}
    config = modelopt_config(spec, group_size, group_sizes, kv_cache_dtype, awq_clip)
    calibrate = spec.needs_calibration or kv_cache_dtype is not None
    logger.info("quantizing %s to %s (%d calibration windows)", src_dir, fmt, len(calib_windows) if calibrate else 0)
    with torch.no_grad():
        mtq.quantize(model, config, _forward_loop(calib_windows, device) if calibrate else None)
        _cast_parameters(model, EXPORT_DTYPE)
        out_dir.mkdir(parents=True, exist_ok=True)
        export_hf_checkpoint(model, export_dir=out_dir)
    _copy_tokenizer_files(src_dir, out_dir)
    seconds = time.perf_counter() - start
    logger.info("wrote %s checkpoint to %s in %.1f s", fmt, out_dir, seconds)
    return QuantizeResult(
        out_dir=out_dir,
        format=fmt,
        num_calib_windows=len(calib_windows) if calibrate else 0,
        kv_cache_dtype=kv_cache_dtype,
        group_sizes=group_sizes,
        seconds=seconds,
    )


def choose_group_sizes(model: torch.nn.Module, group_size: int) -> dict[str, int]:
    """Group size per quantized linear: the largest power of two <= group_size dividing its input dim.

    ModelOpt's int4 export cannot pack partial groups (SmolLM2's 576 with 128), so a layer whose input
    dim the requested size does not divide gets a smaller one (576 -> 64). Raises UserInputError when
    no group of at least MIN_GROUP_SIZE fits, or an output dim is odd (int4 pairs output rows).
    """
    if group_size < MIN_GROUP_SIZE or group_size & (group_size - 1):
        raise UserInputError(f"--group-size must be a power of two >= {MIN_GROUP_SIZE}, got {group_size}")
    chosen: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lm_head" in name:
            continue
        size = group_size
        while module.in_features % size:
            size //= 2
        if size < MIN_GROUP_SIZE:
            raise UserInputError(
                f"{name}: input dim {module.in_features} has no power-of-two group size >= {MIN_GROUP_SIZE}; "
                "use --format fp8 for this model"
            )
        if module.out_features % 2:
            raise UserInputError(f"{name}: output dim {module.out_features} is odd; int4 needs it even (use fp8)")
        if size != group_size:
            logger.debug("%s: input dim %d -> group size %d", name, module.in_features, size)
        chosen[name] = size
    reduced = sum(size != group_size for size in chosen.values())
    if reduced:
        logger.info("%d of %d layers use groups below %d to divide their input dim", reduced, len(chosen), group_size)
    return chosen


def modelopt_config(
    spec: QuantFormat,
    group_size: int,
    group_sizes: dict[str, int],
    kv_cache_dtype: str | None,
    awq_clip: bool = False,
) -> dict:
    """ModelOpt's quantize config for a format, with per-layer group sizes where they differ."""
    import modelopt.torch.quantization as mtq

    base = {"fp8": mtq.FP8_DEFAULT_CFG, "int4-awq": mtq.INT4_AWQ_CFG, "int4-wo": mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG}
    config = copy.deepcopy(base[spec.name])
    if spec.name == "int4-wo":
        config["algorithm"] = dict(INT4_WO_SCALE_SEARCH)
    elif spec.name == "int4-awq" and awq_clip:
        config["algorithm"] = dict(AWQ_FULL)
    entries = config["quant_cfg"]
    if spec.weight_bits == 4:
        (weight_entry,) = [e for e in entries if e.get("quantizer_name") == "*weight_quantizer"]
        weight_entry["cfg"]["block_sizes"] = {-1: group_size, "type": "static"}
        for name, size in group_sizes.items():
            if size != group_size:
                cfg = {**weight_entry["cfg"], "block_sizes": {-1: size, "type": "static"}}
                entries.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": cfg})
    if kv_cache_dtype == "fp8":
        entries.extend(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    return config


def _check_args(spec: QuantFormat, out_dir: Path, calib_windows: Sequence, kv_cache_dtype: str | None) -> None:
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UserInputError(f"unknown KV cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if (spec.needs_calibration or kv_cache_dtype) and not any(len(w) for w in calib_windows):
        raise UserInputError(f"format {spec.name} needs calibration data, and none was given")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another output directory")


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Weights and AWQ's pre-quant scales to the export dtype, as a model loaded in it would hold them.

    Unquantized tensors are written in their dtype; the pre-quant scales multiply the activations ahead of
    the weights (the export runs a forward). The quantizers' amax buffers stay fp32, as they are in bf16 too.
    """
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name == "_pre_quant_scale" and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))
    model.config.dtype = dtype  # config.json's dtype follows


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _forward_loop(calib_windows: list[list[int]], device: str):
    """ModelOpt's forward_loop: one forward pass per calibration window (batch of one)."""

    def loop(model: torch.nn.Module) -> None:
        for window in calib_windows:
            if window:
                model(torch.tensor([window], dtype=torch.long, device=device))

    return loop


def _copy_tokenizer_files(src_dir: Path, out_dir: Path) -> None:
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_NOT_COPIED_SUFFIXES):
            if not (out_dir / path.name).exists():
                shutil.copy2(path, out_dir / path.name)
