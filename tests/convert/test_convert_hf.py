"""`kiln convert` from Hugging Face directories: round trips in each dtype, sharding, determinism."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.convert.stage import ConvertSpec, convert
from kiln.core.artifact import load_artifact
from kiln.core.hf_checkpoint import INDEX_NAME


def load_all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_round_trip_in_each_dtype(tiny_llama_dir: Path, tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    out = tmp_path / "ckpt"
    artifact = convert(ConvertSpec(source=str(tiny_llama_dir), output=out, dtype=dtype, name="tiny"))

    source_tensors = load_all_tensors(tiny_llama_dir)
    converted = load_all_tensors(out)
    assert converted.keys() == source_tensors.keys()
    for name, tensor in source_tensors.items():
        assert converted[name].dtype == torch_dtype, name
        assert torch.equal(converted[name], tensor.to(torch_dtype)), name

    # transformers loads the artifact as a normal model directory, in the converted dtype.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")
    assert model.dtype == torch_dtype
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("The capital of France").input_ids) == "The capital of France"
    assert tokenizer.chat_template

    manifest = load_artifact(out, kind="checkpoint", verify=True).manifest
    assert artifact.manifest == manifest
    assert manifest.name == "tiny" and manifest.spec["dtype"] == dtype
    assert manifest.parent.kind == "hf-dir" and manifest.parent.digest.startswith("sha256:")
    assert manifest.model["architecture"] == "LlamaForCausalLM"
    assert manifest.model["num_parameters"] == sum(t.numel() for t in source_tensors.values())
    assert {f.path for f in manifest.files} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    }


def test_auto_dtype_keeps_the_source_dtype(tmp_path: Path) -> None:
    source = save_tiny_model(tmp_path / "src", dtype=torch.bfloat16)
    convert(ConvertSpec(source=str(source), output=tmp_path / "out"))
    assert {t.dtype for t in load_all_tensors(tmp_path / "out").values()} == {torch.bfloat16}
    assert load_artifact(tmp_path / "out").manifest.model["dtype"] == "bf16"


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_sharded_input_and_output(tmp_path: Path, architecture: str) -> None:
    source = save_tiny_model(tmp_path / "src", architecture=architecture, max_shard_size="60KB")
    assert (source / INDEX_NAME).is_file()
    out = tmp_path / "out"
    convert(ConvertSpec(source=str(source), output=out, max_shard_bytes=70_000))
    index = json.loads((out / INDEX_NAME).read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1 and shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    for name in shard_names:  # a shard stays under the limit unless one tensor alone is larger
        tensors_in_shard = [t for t, shard in index["weight_map"].items() if shard == name]
        assert (out / name).stat().st_size <= 70_000 + 4096 or len(tensors_in_shard) == 1, name
    converted = load_all_tensors(out)
    assert set(index["weight_map"]) == set(converted)
    for name, tensor in load_all_tensors(source).items():
        assert torch.equal(converted[name], tensor), name
    AutoModelForCausalLM.from_pretrained(out)  # the index is one transformers reads


def test_converting_a_checkpoint_records_it_as_parent(tiny_llama_dir: Path, tmp_path: Path) -> None:
    first = convert(ConvertSpec(source=str(tiny_llama_dir), output=tmp_path / "a", dtype="bf16"))
    second = convert(ConvertSpec(source=str(tmp_path / "a"), output=tmp_path / "b", dtype="fp32"))
    assert second.manifest.parent.kind == "checkpoint"
    assert second.manifest.parent.digest == first.digest


def test_same_input_gives_byte_identical_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    first = convert(ConvertSpec(source=str(tiny_llama_dir), output=tmp_path / "a", dtype="bf16"))
    second = convert(ConvertSpec(source=str(tiny_llama_dir), output=tmp_path / "b", dtype="bf16"))
    assert [(f.path, f.sha256) for f in first.manifest.files] == [(f.path, f.sha256) for f in second.manifest.files]
