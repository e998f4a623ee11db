"""Async scheduling (step N+1 launched before step N's tokens are read) gives what the waiting engine gives.

The CPU runs the same bookkeeping as the GPU (its launches just finish at once): pending tokens fed to
the next step from the sampled tensor, optimistic computed counts, the extra step of a request that
stopped, penalised requests falling back to waiting, aborts while a step is in flight.
"""

from pathlib import Path

import pytest
import torch
from engine_workloads import MAX_TOKENS, hf_greedy, prompts, run_staggered, run_to_completion
from tiny_models import save_tiny_model

from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("async") / "llama", with_tokenizer=False)


def engine_pair(model_dir: Path, **options: object) -> tuple[LLMEngine, LLMEngine]:
    """(waiting engine, async engine) with the same options."""
    config = {"dtype": "fp32", "device": "cpu", "num_kv_blocks": 256, **options}
    return (
        LLMEngine(model_dir, EngineConfig(**config, async_scheduling=False)),
        LLMEngine(model_dir, EngineConfig(**config, async_scheduling=True)),
    )


def run_all(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    for index, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, request_id=str(index))
    return run_to_completion(engine)


def summary(output: RequestOutput) -> list[tuple]:
    return [(c.token_ids, c.finish_reason, c.stop_reason) for c in output.outputs]


def flat_logprobs(output: RequestOutput) -> list[float]:
    return [value for c in output.outputs for entry in c.logprobs or [] for value in entry.values()]


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_greedy_equals_transformers_under_pressure(model_dir: Path, prefix_caching: bool) -> None:
    expected = hf_greedy(model_dir, "cpu")
    config = EngineConfig(
        dtype="fp32", device="cpu", block_size=4, num_kv_blocks=24, max_num_tokens=16, max_batch_size=6,
        max_seq_len=84, enable_prefix_caching=prefix_caching, async_scheduling=True,
    )  # fmt: skip
    engine = LLMEngine(model_dir, config)
    results = run_staggered(engine, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [results[str(i)] for i in range(len(expected))] == expected
    assert engine.scheduler.stats.num_preemptions > 0
    assert engine.kv_cache.num_free_blocks == config.num_kv_blocks - 1  # every block free again
    assert not engine.has_unfinished


def test_sampling_stops_and_logprobs_equal_the_waiting_engine(model_dir: Path) -> None:
    # Stop tokens taken from a first run, so requests stop early (and the async engine computes a step it drops).
    probe = LLMEngine(model_dir, EngineConfig(dtype="fp32", device="cpu", num_kv_blocks=256))
    greedy = run_all(probe, [(prompts()[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])
    stop_token = greedy["0"].token_ids[5]
    requests = [
        (prompts()[0], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_token])),
        (prompts()[1], SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=17, logprobs=2)),
        (prompts()[2], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=9, ignore_eos=True)),
        (prompts()[3], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)),
        (prompts()[4], SamplingParams(temperature=0, min_tokens=8, max_tokens=10, stop_token_ids=[stop_token])),
        (prompts()[5], SamplingParams(temperature=1.0, seed=3, max_tokens=20, prompt_logprobs=1)),
    ]
    waiting, overlapped = engine_pair(model_dir, max_num_tokens=32, block_size=4)
    expected = run_all(waiting, requests)
    got = run_all(overlapped, requests)
    assert expected["0"].outputs[0].finish_reason == "stop"  # the stop path is exercised
    for request_id, output in expected.items():
        assert summary(got[request_id]) == summary(output), request_id
        assert flat_logprobs(got[request_id]) == pytest.approx(flat_logprobs(output), abs=1e-5)
    assert len(flat_logprobs(got["1"])) >= 17 * 2
    prompt_logprobs = [[v for e in o["5"].prompt_logprobs[1:] for v in e.values()] for o in (got, expected)]
    assert len(prompt_logprobs[0]) > 0 and prompt_logprobs[0] == pytest.approx(prompt_logprobs[1], abs=1e-5)
    assert overlapped.kv_cache.num_free_blocks == waiting.kv_cache.num_free_blocks == 255


def test_a_penalised_request_makes_the_engine_wait_for_each_step(model_dir: Path) -> None:
    waiting, overlapped = engine_pair(model_dir)
    penalised = SamplingParams(temperature=1.0, seed=2, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5)
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    requests = [(prompts()[1], plain), (prompts()[2], penalised)]
    expected = run_all(waiting, requests)
    for index, (prompt, params) in enumerate(requests):
        overlapped.add_request(prompt, params, request_id=str(index))
    got: dict[str, RequestOutput] = {}
    while overlapped.has_unfinished:
        penalised_running = "1" in overlapped.groups
        got.update({output.request_id: output for output in overlapped.step() if output.finished})
        if penalised_running:
            assert overlapped._in_flight is None  # every step was read back before the next was scheduled
    assert {key: summary(value) for key, value in got.items()} == {key: summary(v) for key, v in expected.items()}


def test_a_request_aborted_while_its_step_runs_frees_everything(model_dir: Path) -> None:
    waiting, overlapped = engine_pair(model_dir, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = run_all(waiting, [(prompts()[1], params)])
    overlapped.add_request(prompts()[1], params, request_id="0")
    overlapped.add_request(prompts()[2], params, request_id="gone")
    assert overlapped.step() == []  # the first launch: nothing read back yet
    overlapped.step()
    assert overlapped._in_flight is not None
    overlapped.abort("gone")  # its chunk is in the step in flight
    results = run_to_completion(overlapped)
    assert set(results) == {"0"} and results["0"].token_ids == expected["0"].token_ids
    assert overlapped.kv_cache.num_free_blocks == 255 and not overlapped.has_unfinished


def test_stop_strings_cut_the_same_text(tiny_llama_dir: Path) -> None:
    waiting, overlapped = engine_pair(tiny_llama_dir)
    prompt = prompts()[3]
    free_run = run_all(waiting, [(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))])["0"]
    stop = free_run.text[len(free_run.text) // 2 :][:3]
    assert stop.strip(), free_run.text
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    expected = run_all(waiting, [(prompt, params)])["0"]
    got = run_all(overlapped, [(prompt, params)])["0"]
    assert expected.outputs[0].finish_reason == "stop" and expected.text == free_run.text[: len(expected.text)]
    assert (got.text, got.token_ids, got.outputs[0].stop_reason) == (expected.text, expected.token_ids, stop)
    assert overlapped.kv_cache.num_free_blocks == 255


@pytest.mark.gpu
def test_launching_a_step_on_cuda_never_waits_for_the_device(model_dir: Path) -> None:
    # Issue 8's rule for the step loop: the host queues step N+1 while step N runs, so nothing in a launch
    # may read a device value back (graph replays, pending tokens from the device, sampling, seeded draws).
    config = EngineConfig(dtype="fp16", device="cuda", num_kv_blocks=64, max_batch_size=8, max_seq_len=96,
                          attention_backend="triton")  # fmt: skip
    engine = LLMEngine(model_dir, config)
    assert engine.async_scheduling and engine.limits.cuda_graph_batch_sizes
    launch = engine.runner.launch
    num_launches = [0]

    def launch_without_syncs(scheduled):
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the launch raises
        try:
            return launch(scheduled)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            num_launches[0] += 1

    engine.runner.launch = launch_without_syncs
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=16, logprobs=2, min_tokens=4),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True),
    ]
    got = run_all(engine, [(prompts()[i], p) for i, p in enumerate(params)])
    assert num_launches[0] > 10 and engine.runner.decode_graphs.num_replays > 0
    assert [len(c.token_ids) for c in got["0"].outputs] == [12] and len(got["2"].outputs) == 2
