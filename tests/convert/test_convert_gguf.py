"""`kiln convert` from GGUF: the built-in SmolLM2-135M-Instruct, pretrained, through our own model."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln import LLM, SamplingParams
from kiln.core.artifact import load_artifact
from kiln.core.builtin_models import resolve_builtin
from kiln.core.errors import UserInputError
from kiln.core.hashing import sha256_file
from kiln.models.loader import load_model
from kiln.runtime.tokenizer import eos_token_ids


def test_manifest_and_config(builtin_checkpoint: Path) -> None:
    manifest = load_artifact(builtin_checkpoint, kind="checkpoint", verify=True).manifest
    assert manifest.parent.kind == "builtin:smollm2-135m"
    assert manifest.parent.digest == "sha256:" + sha256_file(resolve_builtin("builtin:smollm2-135m"))
    assert manifest.model["architecture"] == "LlamaForCausalLM"
    assert manifest.model["num_layers"] == 30 and manifest.model["num_kv_heads"] == 3
    assert manifest.model["tie_word_embeddings"] is True
    assert manifest.model["dtype"] == "bf16"  # Q4_1 weights dequantized into bf16
    assert 134e6 < manifest.model["num_parameters"] < 135e6
    config = json.loads((builtin_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"


def test_tokenizer_files_work(builtin_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(builtin_checkpoint)
    text = "The capital of France is Paris."
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(builtin_checkpoint, tokenizer)


def test_our_model_matches_transformers_on_the_converted_checkpoint(builtin_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(builtin_checkpoint)
    ids = tokenizer("Kiln turns checkpoints into fast engines.").input_ids
    reference = AutoModelForCausalLM.from_pretrained(builtin_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    model, _ = load_model(builtin_checkpoint, dtype=torch.float32)
    from kiln.kernels.attention import AttentionMetadata

    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prefill([len(ids)], "cpu"))
        logits = model.compute_logits(hidden)
    assert (logits - expected).abs().max() / expected.abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_greedy_answer_knows_paris(builtin_checkpoint: Path) -> None:
    llm = LLM(str(builtin_checkpoint))
    (output,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0))
    assert "Paris" in output.text, output.text
    assert output.finish_reason == "stop"  # the model ends its answer with <|im_end|>


def test_unknown_builtin_name() -> None:
    with pytest.raises(UserInputError, match="unknown built-in model 'builtin:nope'; known: builtin:smollm2-135m"):
        resolve_builtin("builtin:nope")
