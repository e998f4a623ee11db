"""Pipeline parallelism on the CPU (gloo): stages hold only their layers, answer like one process, fail loudly."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_runner import invoke
from tiny_models import save_tiny_model

from kiln import LLM, SamplingParams
from kiln.core.errors import UserInputError, WeightMappingError
from kiln.core.hf_checkpoint import find_weight_files, iter_safetensors
from kiln.models.loader import load_model, load_weights
from kiln.models.pipeline import pipeline_stage, set_pipeline_stage, stage_layers
from kiln.runtime.micro_batches import gather_logit_groups, split_micro_batches, split_sequences
from kiln.runtime.model_runner import StepInputs
from kiln.runtime.pipeline_workers import PipelineParallelError

# Lengths 7, 3, 31 and 2: a step's sequences split into micro-batches of different sizes.
PROMPTS = [[1, 5, 9, 77, 3, 250, 6], [1, 200, 31], list(range(40, 71)), [7, 8]]


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fp32 Llama with 5 decoder layers (2 stages: 3 + 2) and untied embeddings."""
    return save_tiny_model(tmp_path_factory.mktemp("pp") / "five", num_hidden_layers=5, with_tokenizer=False)


@pytest.fixture
def as_stage() -> Iterator:
    """Build models as a stage of a pipeline in this process (no workers); back to one stage afterwards."""
    yield set_pipeline_stage
    set_pipeline_stage(0, 1)


def _parameter_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def _layer_names(*layers: int) -> set[str]:
    """Parameter names of whole decoder layers."""
    parts = (
        "input_layernorm",
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_up_proj",
    )
    return {f"model.layers.{layer}.{part}.weight" for layer in layers for part in (*parts, "mlp.down_proj")}


def test_layers_split_evenly_with_the_extra_on_earlier_stages() -> None:
    assert [stage_layers(30, rank, 4) for rank in range(4)] == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert [stage_layers(30, rank, 3) for rank in range(3)] == [range(0, 10), range(10, 20), range(20, 30)]
    assert [stage_layers(2, rank, 2) for rank in range(2)] == [range(0, 1), range(1, 2)]
    with pytest.raises(UserInputError, match="pp_size=3 exceeds the model's 2 decoder layers"):
        stage_layers(2, 0, 3)


def test_each_stage_builds_and_loads_only_its_layers(five_layers: Path, as_stage) -> None:
    whole, _ = load_model(five_layers, dtype=torch.float32)
    as_stage(0, 2)
    first, _ = load_model(five_layers, dtype=torch.float32)
    as_stage(1, 2)
    last, _ = load_model(five_layers, dtype=torch.float32)
    assert _parameter_names(first) == {"model.embed_tokens.weight"} | _layer_names(0, 1, 2)
    assert _parameter_names(last) == {"model.norm.weight", "lm_head.weight"} | _layer_names(3, 4)
    everything = dict(whole.named_parameters())
    for stage in (first, last):
        for name, param in stage.named_parameters():
            assert torch.equal(param, everything[name]), name


def test_a_tied_last_stage_keeps_the_embedding_for_its_head(tmp_path: Path, as_stage) -> None:
    tied = save_tiny_model(tmp_path / "tied", num_hidden_layers=3, tie_word_embeddings=True, with_tokenizer=False)
    as_stage(1, 3)
    middle, _ = load_model(tied, dtype=torch.float32)
    as_stage(2, 3)
    last, _ = load_model(tied, dtype=torch.float32)
    assert _parameter_names(middle) == _layer_names(1)
    assert _parameter_names(last) == {"model.embed_tokens.weight", "model.norm.weight"} | _layer_names(2)


def test_a_stage_checks_coverage_of_what_it_holds(five_layers: Path, as_stage) -> None:
    lost = "model.layers.3.mlp.up_proj.weight"
    tensors = [(n, t.clone()) for n, t in iter_safetensors(find_weight_files(five_layers)) if n != lost]
    whole, _ = load_model(five_layers, dtype=torch.float32)
    for rank in (0, 1):
        as_stage(rank, 2)
        with torch.device("meta"):
            stage = type(whole)(whole.config)
        if rank == 0:  # layer 3 is stage 1's: stage 0 loads without it
            load_weights(stage, tensors, torch.float32, "cpu")
        else:
            with pytest.raises(WeightMappingError, match=re.escape(f"missing tensors: {lost}. Check")):
                load_weights(stage, tensors, torch.float32, "cpu")


def test_an_engine_file_loads_per_stage(serve_checkpoint: Path, tmp_path: Path, as_stage) -> None:
    from kiln.build.stage import BuildSpec, build

    build(BuildSpec(source=serve_checkpoint, output=tmp_path / "engine", target_gpu="cpu", max_seq_len=128))
    as_stage(1, 2)
    from_engine, _ = load_model(tmp_path / "engine", dtype=torch.float32)
    from_checkpoint, _ = load_model(serve_checkpoint, dtype=torch.float32)
    assert _parameter_names(from_engine) == {"model.norm.weight", "lm_head.weight"} | _layer_names(1)
    expected = dict(from_checkpoint.named_parameters())
    assert all(torch.equal(param, expected[name]) for name, param in from_engine.named_parameters())


def test_micro_batches_are_whole_sequences_and_logits_come_back_in_the_steps_groups() -> None:
    assert split_sequences([7, 3, 31, 2], 2) == [range(0, 2), range(2, 4)]
    assert split_sequences([7, 3, 31, 2], 3) == [range(0, 2), range(2, 3), range(3, 4)]  # 10, 31, 2 tokens
    assert split_sequences([1, 1, 1], 4) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_sequences([5], 2) == [range(0, 1)]
    lens = [7, 3, 31, 2]
    step = StepInputs(
        input_ids=list(range(43)), positions=list(range(43)), slot_mapping=list(range(43)), query_lens=lens,
        seq_lens=lens, block_tables=[[1], [2], [3, 4], [5]], logit_rows=[[1, 2], [6, 9, 40, 42]],
    )  # fmt: skip
    first, second = split_micro_batches(step, 2)
    assert (first.token_offset, first.num_tokens, first.inputs.logit_rows) == (0, 10, [[1, 2, 6, 9]])
    assert (second.token_offset, second.num_tokens, second.inputs.logit_rows) == (10, 33, [[30, 32]])
    assert second.inputs.block_tables == [[3, 4], [5]] and second.inputs.input_ids == list(range(10, 43))
    logits = torch.tensor([[1.0], [2.0], [6.0], [9.0], [40.0], [42.0]])  # the rows 1, 2, 6, 9, 40, 42 in order
    assert [group[:, 0].tolist() for group in gather_logit_groups(step, logits)] == [[1, 2], [6, 9, 40, 42]]


@pytest.mark.parametrize("tp_size", [1, 2], ids=["pp2", "pp2-tp2"])
def test_two_stages_give_the_tokens_and_prompt_logprobs_of_one(five_layers: Path, tp_size: int) -> None:
    # max_num_tokens=16: the 31-token prompt is prefilled in chunks, alongside the others' decodes. With
    # tp_size=2 each stage is two tensor-parallel ranks: 4 processes, hidden states sent rank to same rank.
    options = dict(device="cpu", num_kv_blocks=64, max_num_tokens=16)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    expected = LLM(str(five_layers), **options).generate(PROMPTS, params)
    llm = LLM(str(five_layers), **options, pp_size=2, tp_size=tp_size)
    try:
        got = llm.generate(PROMPTS, params)
        assert len(llm.engine.workers.processes) == 2 * tp_size - 1
        assert len(llm.engine.runner.attention_layers) == 3  # stage 0 caches keys and values of layers 0-2 only
    finally:
        llm.engine.shutdown()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    for ours, theirs in zip(got, expected):
        for a, b in zip(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert multiprocessing.active_children() == []


def test_idle_stages_wait_and_a_killed_stage_ends_the_run_with_an_error(serve_checkpoint: Path) -> None:
    llm = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64, pp_size=2, tp_timeout_s=10)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        llm.generate(PROMPTS, params)
        time.sleep(11)  # idle past the timeout (a server between requests): the stages wait for the next step
        assert [len(r.token_ids) for r in llm.generate(PROMPTS, params)] == [4] * len(PROMPTS)
        (worker,) = llm.engine.workers.processes
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(PipelineParallelError, match="stopped"):
            llm.generate(PROMPTS, params)
        assert time.monotonic() - start < 15
    finally:
        llm.engine.shutdown()
    assert pipeline_stage().size == 1


def test_builtin_smollm2_in_three_stages_generates_the_same_tokens(builtin_checkpoint: Path) -> None:
    # SmolLM2: 30 layers -> 10 per stage; tied embeddings, so the last stage holds the table for its head.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_tokens=24, temperature=0)
    (expected,) = LLM(str(builtin_checkpoint)).chat(messages, params)
    llm = LLM(str(builtin_checkpoint), pp_size=3)
    try:
        (got,) = llm.chat(messages, params)
    finally:
        llm.engine.shutdown()
    assert got.token_ids == expected.token_ids and "Paris" in got.text


@pytest.mark.parametrize(
    "options,message",
    [
        ({"pp_size": 2, "tp_size": 3}, "--tp-size 3 does not split the model"),
        ({"pp_size": 3}, "pp_size=3 exceeds the model's 2 decoder layers"),
        ({"pp_size": 0}, "pp_size must be a positive integer"),
    ],
)
def test_refusals_start_no_process(serve_checkpoint: Path, options: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64, **options)
    assert multiprocessing.active_children() == []


def test_cli_flags_reach_the_engine(serve_checkpoint: Path, capsys) -> None:
    code, _, err = invoke(capsys, "run", str(serve_checkpoint), "-p", "hi", "--pp-size", "2", "--tp-size", "3")
    assert code == 2 and "--tp-size 3 does not split the model" in err
    code, _, err = invoke(capsys, "bench", "throughput", str(serve_checkpoint), "--device", "cpu", "--pp-size", "3")
    assert code == 2 and "exceeds the model's 2 decoder layers" in err
