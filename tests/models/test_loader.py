"""load_model / load_weights: coverage errors name the tensors; sharded and tied checkpoints load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.core.errors import ConfigError, SourceError, UnsupportedArchitectureError, WeightMappingError
from kiln.kernels.attention import AttentionMetadata
from kiln.models.config import ModelConfig
from kiln.models.loader import load_model
from kiln.models.registry import SUPPORTED_ARCHITECTURES, get_model_class


def edit_checkpoint(path, edit) -> None:
    """Rewrite model.safetensors after `edit(tensors)` changes the name -> tensor dict in place."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@torch.inference_mode()
def assert_same_logits(model, hf_model, num_tokens: int = 6) -> None:
    ids = torch.arange(num_tokens) * 7 % 256
    metadata = AttentionMetadata.for_prefill([num_tokens], "cpu")
    ours = model.compute_logits(model(ids, torch.arange(num_tokens), metadata))
    ref = hf_model(ids[None]).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ],
)
def test_missing_tensor_is_named(hf_checkpoint, name):
    _, path = hf_checkpoint("llama_gqa")
    edit_checkpoint(path, lambda tensors: tensors.pop(name))
    with pytest.raises(WeightMappingError, match=f"missing tensors: {name.replace('.', '[.]')}"):
        load_model(path)


def test_unknown_tensor_is_named(hf_checkpoint):
    _, path = hf_checkpoint("llama_gqa")
    extra = "model.layers.0.self_attn.extra.weight"
    edit_checkpoint(path, lambda tensors: tensors.update({extra: torch.ones(2)}))
    with pytest.raises(WeightMappingError, match=rf"unknown tensors.*{extra.replace('.', '[.]')}"):
        load_model(path)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ],
)
def test_wrong_shape_is_named(hf_checkpoint, name):
    _, path = hf_checkpoint("llama_gqa")

    def shrink(tensors):
        tensors[name] = tensors[name][:-1].clone()

    edit_checkpoint(path, shrink)
    with pytest.raises(WeightMappingError, match=rf"{name.replace('.', '[.]')}: shape \("):
        load_model(path)


def test_sharded_checkpoint_loads(hf_checkpoint):
    hf_model, path = hf_checkpoint("qwen2", max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    model, _ = load_model(path, dtype=torch.float32)
    assert_same_logits(model, hf_model)


def test_loaded_model_owns_its_weights_and_skips_computed_buffers(hf_checkpoint):
    hf_model, path = hf_checkpoint("llama_gqa")
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"  # saved by some older checkpoints
    edit_checkpoint(path, lambda tensors: tensors.update({inv_freq: torch.ones(8)}))
    model, _ = load_model(path)
    # Rewriting the file in place must not reach the live model (safetensors hands out mmap views).
    with open(path / "model.safetensors", "r+b") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")  # u64 header length, then the header
        f.seek(data_start)
        f.write(bytes((path / "model.safetensors").stat().st_size - data_start))
    assert_same_logits(model, hf_model)


def test_tied_lm_head_in_source_is_accepted_only_when_tied(hf_checkpoint):
    hf_model, path = hf_checkpoint("smollm_tied_mqa")
    edit_checkpoint(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model, config = load_model(path)
    assert config.tie_word_embeddings and model.lm_head is None
    assert_same_logits(model, hf_model)

    config_path = path / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tie_word_embeddings": False}))
    load_model(path)  # untied: the same lm_head.weight is now a required tensor, and present
    edit_checkpoint(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(WeightMappingError, match="missing tensors: lm_head.weight"):
        load_model(path)


def test_dtype_device_and_no_meta_left(hf_checkpoint):
    _, path = hf_checkpoint("llama_bias")
    model, config = load_model(path)  # dtype from config.json ("float32")
    assert config.torch_dtype == "float32"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model, _ = load_model(path, dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors) and all(t.device.type == "cpu" for t in tensors)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.layers[0].self_attn.qkv_proj.bias.dtype == torch.bfloat16


def test_pickle_only_checkpoint_is_refused(tmp_path, hf_config_dict):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict("llama_gqa")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SourceError, match="pytorch_model.bin"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path)
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
    assert get_model_class("Qwen2ForCausalLM") is get_model_class("LlamaForCausalLM")


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_attention_heads", "intermediate_size"])
def test_config_missing_field_is_named(hf_config_dict, field):
    hf = hf_config_dict("llama_gqa")
    del hf[field]
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(hf)


def test_config_malformed_fields(hf_config_dict):
    for field, value in [
        ("num_hidden_layers", "2"),
        ("num_key_value_heads", 3),
        ("rms_norm_eps", -1.0),
        ("tie_word_embeddings", "yes"),
        ("hidden_act", "gelu"),
    ]:
        with pytest.raises(ConfigError, match=field if field != "num_key_value_heads" else "multiple"):
            ModelConfig.from_hf_config({**hf_config_dict("llama_gqa"), field: value})


def test_config_rope_normalisation(hf_config_dict):
    new = ModelConfig.from_hf_config(hf_config_dict("linear_rope"))
    old_style = {
        **hf_config_dict("llama_gqa"),
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    del old_style["rope_parameters"]
    assert ModelConfig.from_hf_config(old_style) == new
    assert new.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    llama3 = ModelConfig.from_hf_config(hf_config_dict("llama3_rope"))
    assert llama3.rope_theta == 500000.0 and llama3.rope_scaling["original_max_position_embeddings"] == 32
    for rope_type in ("dynamic", "longrope", "made_up"):
        hf = {**hf_config_dict("llama_gqa"), "rope_parameters": {"rope_type": rope_type, "factor": 2.0}}
        with pytest.raises(ConfigError, match=rope_type):
            ModelConfig.from_hf_config(hf)
    hf = {**hf_config_dict("llama_gqa"), "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ConfigError, match="low_freq_factor"):
        ModelConfig.from_hf_config(hf)


def test_config_family_differences(hf_config_dict):
    qwen2 = ModelConfig.from_hf_config(hf_config_dict("qwen2"))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.sliding_window is None
    qwen2_swa = ModelConfig.from_hf_config(hf_config_dict("qwen2_swa"))
    assert qwen2_swa.sliding_window == 4
    assert [qwen2_swa.layer_sliding_window(i) for i in range(2)] == [None, 4]
    legacy = {**hf_config_dict("qwen2_swa"), "layer_types": None}  # older configs: max_window_layers
    assert ModelConfig.from_hf_config(legacy).layer_types == qwen2_swa.layer_types
    off = {**hf_config_dict("qwen2"), "use_sliding_window": False, "sliding_window": 131072}
    assert ModelConfig.from_hf_config(off).sliding_window is None
    mistral = ModelConfig.from_hf_config(hf_config_dict("mistral_swa"))
    assert mistral.head_dim == 32 and not mistral.attention_bias
    assert [mistral.layer_sliding_window(i) for i in range(2)] == [4, 4]
    mistral_full = ModelConfig.from_hf_config({**hf_config_dict("mistral_swa"), "sliding_window": None})
    assert mistral_full.layer_sliding_window(0) is None
    llama = ModelConfig.from_hf_config(hf_config_dict("llama_bias"))
    assert llama.attention_bias and llama.o_proj_bias and llama.mlp_bias
