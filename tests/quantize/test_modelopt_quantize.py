"""quantize_checkpoint: ModelOpt export per format, group sizes that fit, KV scales, byte-identical reruns."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kiln.core.errors import OutputExistsError, UserInputError
from kiln.quantize.formats import get_format
from kiln.quantize.modelopt_quantize import choose_group_sizes, quantize_checkpoint

# A declared dependency (installed by `make test`); machines without it (the GPU image) skip these tests.
pytest.importorskip("modelopt")

FORMATS = ["fp8", "int4-awq", "int4-wo"]


def calib_windows(num: int = 4, length: int = 16, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(320) for _ in range(length)] for _ in range(num)]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def weights_digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """Factory: the tiny model quantized to a format (once per module)."""
    cache: dict[tuple, Path] = {}

    def make(fmt: str, kv_cache_dtype: str | None = None) -> Path:
        key = (fmt, kv_cache_dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("quantized") / f"{fmt}-{kv_cache_dtype}"
            quantize_checkpoint(tiny_llama_dir, out, fmt, calib_windows(), kv_cache_dtype=kv_cache_dtype)
            cache[key] = out
        return cache[key]

    return make


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_modelopt_hf_checkpoint(exported, fmt):
    out = exported(fmt)
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt"
    assert (out / "tokenizer.json").is_file()
    tensors = tensors_of(out)
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # unquantized layers in bf16, not fp32
    q_proj = "model.layers.0.self_attn.q_proj"
    if fmt == "fp8":
        assert hf_quant["quant_algo"] == qc["quant_algo"] == "FP8"
        assert tensors[f"{q_proj}.weight"].dtype == torch.float8_e4m3fn
        assert tensors[f"{q_proj}.weight_scale"].shape == tensors[f"{q_proj}.input_scale"].shape == ()
    else:
        # hidden 64 takes group 64, intermediate 128 takes 128: a MIXED_PRECISION export.
        assert qc["quant_algo"] == "MIXED_PRECISION"
        layers = qc["quantized_layers"]
        assert layers[q_proj]["group_size"] == 64
        assert layers["model.layers.0.mlp.down_proj"]["group_size"] == 128
        assert tensors[f"{q_proj}.weight"].dtype == torch.uint8
        assert tensors[f"{q_proj}.weight"].shape == (32, 64)  # [out / 2, in]
        assert tensors[f"{q_proj}.weight_scale"].shape == (64, 1)  # [out, in / group]
        has_pre_quant = "model.layers.0.mlp.down_proj.pre_quant_scale" in tensors
        assert has_pre_quant == (fmt == "int4-awq")


def test_fp8_kv_cache_adds_kv_scales(exported):
    out = exported("fp8", "fp8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert "kv_cache_scheme" in qc
    tensors = tensors_of(out)
    assert tensors["model.layers.1.self_attn.k_proj.k_scale"].item() > 0
    assert tensors["model.layers.1.self_attn.v_proj.v_scale"].item() > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_inputs_give_identical_weight_files(exported, tmp_path, tiny_llama_dir, fmt):
    again = quantize_checkpoint(tiny_llama_dir, tmp_path / "again", fmt, calib_windows()).out_dir
    assert weights_digest(again) == weights_digest(exported(fmt))


def test_group_sizes_fit_each_input_dim(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    sizes = choose_group_sizes(model, 128)
    assert sizes["model.layers.0.self_attn.q_proj"] == 64  # 64 % 128 != 0
    assert sizes["model.layers.0.mlp.down_proj"] == 128
    assert "lm_head" not in sizes
    assert choose_group_sizes(model, 32)["model.layers.0.mlp.down_proj"] == 32
    for bad in (100, 8):
        with pytest.raises(UserInputError, match="power of two"):
            choose_group_sizes(model, bad)


def test_refusals(tiny_llama_dir, tmp_path):
    with pytest.raises(UserInputError, match="unknown quantization format"):
        get_format("int3")
    with pytest.raises(UserInputError, match="needs calibration data"):
        quantize_checkpoint(tiny_llama_dir, tmp_path / "a", "fp8", [])
    with pytest.raises(UserInputError, match="KV cache dtype"):
        quantize_checkpoint(tiny_llama_dir, tmp_path / "b", "fp8", calib_windows(), kv_cache_dtype="int8")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        quantize_checkpoint(tiny_llama_dir, tmp_path / "c", "int4-wo", [])


def test_int4_scales_are_searched(exported, tiny_llama_dir, tmp_path):
    # int4-wo searches each group's scale (ModelOpt's mse); int4-awq keeps awq_lite unless awq_clip asks for
    # AWQ's clipping search too, which changes the group scales.
    from kiln.quantize.formats import get_format
    from kiln.quantize.modelopt_quantize import AWQ_FULL, INT4_WO_SCALE_SEARCH, modelopt_config

    assert modelopt_config(get_format("int4-wo"), 32, {}, None)["algorithm"] == INT4_WO_SCALE_SEARCH
    assert modelopt_config(get_format("int4-awq"), 32, {}, None)["algorithm"]["method"] == "awq_lite"
    assert modelopt_config(get_format("int4-awq"), 32, {}, None, awq_clip=True)["algorithm"] == AWQ_FULL
    clipped = quantize_checkpoint(tiny_llama_dir, tmp_path / "clip", "int4-awq", calib_windows(), awq_clip=True)
    tensors = tensors_of(clipped.out_dir)
    lite = tensors_of(exported("int4-awq"))
    name = "model.layers.0.mlp.down_proj.weight_scale"
    assert tensors[name].shape == lite[name].shape and not torch.equal(tensors[name], lite[name])
