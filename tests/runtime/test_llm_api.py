"""`from kiln import LLM, SamplingParams`: greedy parity per family, order, streaming, chat, options."""

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.core.errors import UserInputError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_generate_equals_transformers_greedy(tmp_path: Path, device: str, architecture: str) -> None:
    source = save_tiny_model(tmp_path / architecture, architecture=architecture, with_tokenizer=False)
    batch = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [200] * 20]
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    expected = [
        reference.generate(torch.tensor([p], device=device), max_new_tokens=30, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        for p in batch
    ]
    llm = LLM(str(source), dtype="fp32", device=device, block_size=4, num_kv_blocks=128)
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert [output.token_ids for output in outputs] == expected  # input order, token for token


def test_text_prompts_stream_and_chat(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="fp32", num_kv_blocks=128)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (whole,) = llm.generate("The capital of France", params)
    deltas = list(llm.generate_stream("The capital of France", params))
    assert "".join(delta.text for delta in deltas) == whole.text
    assert sum((delta.token_ids for delta in deltas), []) == whole.token_ids
    assert deltas[-1].output.finished and whole.finish_reason == "length"
    metrics = whole.metrics
    assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time <= metrics.finish_time
    assert metrics.queue_time + metrics.prefill_time == pytest.approx(metrics.time_to_first_token)
    chat = llm.chat([{"role": "user", "content": "hi"}], params)
    assert chat[0].prompt_token_ids == llm.tokenizer("user: hi\nassistant:", add_special_tokens=False).input_ids


def test_stop_strings_are_not_emitted(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="fp32", num_kv_blocks=128)
    (free_run,) = llm.generate("A quick", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stop = free_run.text[5:8]
    (stopped,) = llm.generate("A quick", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    assert stopped.text == free_run.text[: free_run.text.index(stop)]


def test_bad_options_are_clear_errors(tiny_llama_dir: Path) -> None:
    with pytest.raises(UserInputError, match="unknown LLM option"):
        LLM(str(tiny_llama_dir), max_batch=3)
    with pytest.raises(UserInputError, match="max_batch_size must be a positive integer"):
        LLM(str(tiny_llama_dir), max_batch_size=0)
    llm = LLM(str(tiny_llama_dir), dtype="fp32", num_kv_blocks=128)
    with pytest.raises(UserInputError, match="2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])
