"""Tiny random Hugging Face models of each supported family, saved as checkpoints for kiln to load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import TINY_SIZES

TINY = {**TINY_SIZES, "rms_norm_eps": 1e-5}
# name -> (config class, overrides of TINY). Each case exercises one difference inside the family.
CASES: dict[str, tuple[type, dict]] = {
    "llama_gqa": (transformers.LlamaConfig, {}),
    "llama_mha": (transformers.LlamaConfig, {"num_key_value_heads": 4}),
    "llama_bias": (transformers.LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "llama3_rope": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "linear_rope": (
        transformers.LlamaConfig,
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "yarn_rope": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    # head_dim given and != hidden / heads; a window smaller than the test sequences.
    "mistral_swa": (transformers.MistralConfig, {"sliding_window": 4, "head_dim": 32}),
    # q/k/v bias; the window applies from layer max_window_layers (1) on.
    "qwen2_swa": (transformers.Qwen2Config, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen2": (transformers.Qwen2Config, {}),
    "smollm_tied_mqa": (transformers.LlamaConfig, {"tie_word_embeddings": True, "num_key_value_heads": 1}),
}


def build_hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random HF causal LM; every weight (norms and biases too) gets distinct random values."""
    config_class, overrides = CASES[case]
    config = config_class(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                # Larger than HF's init so attention is sharp and rope/mask errors show in the logits.
                param.normal_(0.0, 0.2)
    return model


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking a `case` argument runs over every case unless it parametrizes `case` itself."""
    if "case" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        names = names.split(",") if isinstance(names, str) else names
        if "case" in [name.strip() for name in names]:
            return
    metafunc.parametrize("case", list(CASES))


@pytest.fixture
def hf_config_dict() -> Callable[[str], dict]:
    """Factory: the config.json dict of a case, as transformers writes it."""

    def make(case: str) -> dict:
        config_class, overrides = CASES[case]
        architecture = config_class.__name__.replace("Config", "ForCausalLM")
        return config_class(**{**TINY, **overrides}, architectures=[architecture]).to_dict()

    return make


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[transformers.PreTrainedModel, Path]]:
    """Factory: save a tiny HF model of a case as safetensors; returns (hf_model, directory)."""

    def make(case: str, **save_kwargs) -> tuple[transformers.PreTrainedModel, Path]:
        model = build_hf_model(case)
        path = tmp_path / case
        model.save_pretrained(path, **save_kwargs)
        return model, path

    return make
