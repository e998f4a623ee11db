"""Bad sources are refused with a clear message and exit code 2, and nothing is left half-written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from kiln.cli.main import main
from kiln.convert.stage import ConvertSpec, convert
from kiln.core.safetensors_writer import ShardedSafetensorsWriter


def run_convert(source: Path, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    code = main(["convert", str(source), "-o", str(out), *flags])
    captured = capsys.readouterr()
    return code, " ".join((captured.err + captured.out).split())  # rich wraps long lines


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture()
def model_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "src"))


def test_pickle_checkpoint_dir(model_copy: Path, tmp_path: Path, capsys) -> None:
    (model_copy / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, model_copy / "pytorch_model.bin")
    code, message = run_convert(model_copy, tmp_path / "out", capsys)
    assert code == 2
    assert "never loads pickle checkpoints (pytorch_model.bin)" in message and "safe_serialization=True" in message
    assert "Traceback" not in message
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_checkpoint_file(tmp_path: Path, capsys, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    code, message = run_convert(path, tmp_path / "out", capsys)
    assert code == 2 and "never loads pickle checkpoints" in message
    assert_nothing_written(tmp_path / "out")


def test_missing_config(model_copy: Path, tmp_path: Path, capsys) -> None:
    (model_copy / "config.json").unlink()
    code, message = run_convert(model_copy, tmp_path / "out", capsys)
    assert code == 2 and "has no config.json" in message
    assert_nothing_written(tmp_path / "out")


def test_malformed_config(model_copy: Path, tmp_path: Path, capsys) -> None:
    (model_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    code, message = run_convert(model_copy, tmp_path / "out", capsys)
    assert code == 2 and "config.json is not valid JSON" in message
    assert_nothing_written(tmp_path / "out")


def test_config_missing_a_field(model_copy: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    del config["hidden_size"]
    (model_copy / "config.json").write_text(json.dumps(config))
    code, message = run_convert(model_copy, tmp_path / "out", capsys)
    assert code == 2 and "hidden_size" in message
    assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture(tmp_path: Path, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(source)
    code, message = run_convert(source, tmp_path / "out", capsys)
    assert code == 2
    assert "GPT2LMHeadModel is not supported" in message
    assert "LlamaForCausalLM" in message and "MistralForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(model_copy: Path, tmp_path: Path, capsys, damage: str) -> None:
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00\x13garbage" * 100 if damage == "garbage" else data[: len(data) // 2])
    code, message = run_convert(model_copy, tmp_path / "out", capsys)
    assert code == 2 and "model.safetensors is not a valid safetensors file" in message
    assert_nothing_written(tmp_path / "out")


def test_missing_shard(tmp_path: Path, capsys) -> None:
    source = save_tiny_model(tmp_path / "src", max_shard_size="60KB")
    shard = sorted(source.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, message = run_convert(source, tmp_path / "out", capsys)
    assert code == 2 and f"missing: {shard.name}" in message
    assert_nothing_written(tmp_path / "out")


def test_non_empty_output_dir(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, message = run_convert(tiny_llama_dir, out, capsys)
    assert code == 2 and "is not empty; pass --force" in message
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _ = run_convert(tiny_llama_dir, out, capsys, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "manifest.yaml").is_file()


def test_missing_source_and_bad_flags(tmp_path: Path, capsys) -> None:
    code, message = run_convert(tmp_path / "nope", tmp_path / "out", capsys)
    assert code == 2 and "does not exist" in message
    code, message = run_convert(tmp_path, tmp_path / "out", capsys, "--dtype", "int3")
    assert code == 2 and "--dtype must be one of" in message
    assert_nothing_written(tmp_path / "out")


def test_failure_mid_conversion_leaves_nothing(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []
    original_add = ShardedSafetensorsWriter.add

    def failing_add(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("No space left on device")
        original_add(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", failing_add)
    with pytest.raises(OSError):
        convert(ConvertSpec(source=str(tiny_llama_dir), output=tmp_path / "out", max_shard_bytes=10_000))
    assert_nothing_written(tmp_path / "out")


def test_weights_that_do_not_fit_the_config(model_copy: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :10].contiguous()
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    code, message = run_convert(model_copy, tmp_path / "out", capsys)
    assert code == 2
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in message
    assert "model.layers.0.mlp.up_proj.weight" in message
    assert_nothing_written(tmp_path / "out")


def test_unreadable_gguf_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 7 + b"garbage")
    code, message = run_convert(path, tmp_path / "out", capsys)
    assert code == 2 and "model.gguf is not a readable GGUF file" in message
    assert_nothing_written(tmp_path / "out")


def test_quantized_checkpoint_is_refused(model_copy: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (model_copy / "config.json").write_text(json.dumps(config))
    code, message = run_convert(model_copy, tmp_path / "out", capsys)
    assert code == 2 and "already quantized (modelopt)" in message
    assert_nothing_written(tmp_path / "out")
