"""Every --dummy-weights preset is a config our model code takes, with the published parameter count."""

from __future__ import annotations

import pytest

from kiln.build.planner import weight_bytes
from kiln.models.config import ModelConfig
from kiln.models.presets import PRESETS

PUBLISHED_BILLIONS = {"llama-3-8b": 8.03, "llama-3.1-8b": 8.03, "llama-3-70b": 70.6, "llama-3.2-1b": 1.24,
                      "mistral-7b": 7.25, "qwen2.5-7b": 7.62}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name: str) -> None:
    config = ModelConfig.from_hf_config(PRESETS[name])
    billions = weight_bytes(config, None, "bf16", 1) / 2 / 1e9
    assert billions == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)


def test_dummy_model_dir_keeps_the_tokenizer_of_its_source_and_no_other(tmp_path) -> None:
    import json

    from kiln.models.presets import dummy_model_dir

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    with_tokenizer, without = tmp_path / "a" / "model", tmp_path / "b" / "model"  # same name: same cache folder
    for directory in (with_tokenizer, without):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps(config))
    (with_tokenizer / "tokenizer.json").write_text("{}")
    out = dummy_model_dir(str(with_tokenizer), tmp_path / "cache")
    assert (out / "tokenizer.json").read_text() == "{}"
    assert not (dummy_model_dir(str(without / "config.json"), tmp_path / "cache") / "tokenizer.json").exists()
    assert not (dummy_model_dir("llama-3-8b", tmp_path / "cache") / "tokenizer.json").exists()
