"""Single-request generation equals transformers' greedy `generate`, token for token, on CPU and GPU."""

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from kiln.core.errors import UserInputError
from kiln.models.loader import load_model
from kiln.runtime.generate import GenerationOptions, SingleSequenceGenerator, sample

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_greedy_equals_transformers_generate(tmp_path: Path, device: str, architecture: str) -> None:
    source = save_tiny_model(tmp_path / architecture, architecture=architecture, with_tokenizer=False)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    expected = reference.generate(
        torch.tensor([prompt], device=device), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()

    model, config = load_model(source, dtype=torch.float32, device=device)
    # block_size 4: the 47-token sequence spans 12 blocks, so decode crosses many block boundaries.
    result = SingleSequenceGenerator(model, config, block_size=4).generate(prompt, GenerationOptions(max_tokens=40))
    assert result.token_ids == expected
    assert result.finish_reason == "length"


def test_stops_at_a_stop_token(tiny_llama_dir: Path) -> None:
    model, config = load_model(tiny_llama_dir)
    generator = SingleSequenceGenerator(model, config)
    free_run = generator.generate([1, 2, 3], GenerationOptions(max_tokens=10)).token_ids
    stop_at = free_run[3]
    stopped = generator.generate([1, 2, 3], GenerationOptions(max_tokens=10, stop_token_ids=(stop_at,)))
    assert stopped.token_ids == free_run[: free_run.index(stop_at) + 1]
    assert stopped.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny_llama_dir: Path) -> None:
    model, config = load_model(tiny_llama_dir)
    generator = SingleSequenceGenerator(model, config)
    options = GenerationOptions(max_tokens=12, temperature=1.5, seed=3)
    first = generator.generate([1, 2, 3], options).token_ids
    assert generator.generate([1, 2, 3], options).token_ids == first
    assert generator.generate([1, 2, 3], GenerationOptions(max_tokens=12, temperature=1.5, seed=4)).token_ids != first


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, 0.7, generator) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
    assert sample(logits, 0.0, 1.0, generator) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ],
)
def test_invalid_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        GenerationOptions(**options)
