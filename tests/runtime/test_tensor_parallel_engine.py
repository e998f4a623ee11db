"""The engine with tensor-parallel worker processes (CPU, gloo): same tokens as one rank; a dead worker is an error."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from kiln import LLM, SamplingParams
from kiln.core.errors import ConfigError
from kiln.models.parallel import tensor_parallel
from kiln.runtime.tp_workers import TensorParallelError

PROMPTS = [[1, 5, 9, 77, 3, 250, 6], [1, 200, 31], list(range(40, 71))]


@pytest.mark.parametrize("tp_size,overlap", [(2, False), (4, False), (2, True)], ids=["tp2", "tp4", "tp2-async"])
def test_tp_greedy_tokens_and_prompt_logprobs_equal_one_rank(serve_checkpoint: Path, tp_size: int, overlap: bool):
    # With async scheduling the workers take the previous step's tokens from rank 0 by broadcast.
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    expected = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64).generate(PROMPTS, params)
    llm = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64, tp_size=tp_size, async_scheduling=overlap)
    try:
        got = llm.generate(PROMPTS, params)
    finally:
        llm.engine.shutdown()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    for ours, theirs in zip(got, expected):
        for a, b in zip(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


@pytest.mark.parametrize("fmt,kv_cache_dtype", [("fp8", "fp8"), ("int4-awq", None)])
def test_quantized_tp_greedy_tokens_equal_one_rank(modelopt_checkpoint, fmt: str, kv_cache_dtype: str | None) -> None:
    # fp8 with its calibrated FP8 KV cache (the k/v scales whole on every rank); int4 in groups of 16, so
    # each rank's o_proj and down_proj inputs (32, 64) are whole groups.
    path = modelopt_checkpoint(fmt, 16, kv_cache_dtype)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = LLM(str(path), device="cpu", num_kv_blocks=64).generate(PROMPTS, params)
    llm = LLM(str(path), device="cpu", num_kv_blocks=64, tp_size=2)
    try:
        got = llm.generate(PROMPTS, params)
    finally:
        llm.engine.shutdown()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_a_refusal_on_rank_0_leaves_no_worker_behind(modelopt_checkpoint) -> None:
    # int4 groups of 128 cannot be split between 2 ranks: rank 0 refuses while loading, after the workers started.
    path = modelopt_checkpoint("int4-wo", 128)
    with pytest.raises(ConfigError, match="smaller --group-size"):
        LLM(str(path), device="cpu", num_kv_blocks=64, tp_size=2, tp_timeout_s=20)
    assert multiprocessing.active_children() == []
    assert tensor_parallel().size == 1


def test_a_killed_worker_ends_the_run_with_an_error(serve_checkpoint: Path) -> None:
    llm = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64, tp_size=2, tp_timeout_s=20)
    try:
        (worker,) = llm.engine.workers.processes
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="stopped"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))
        assert time.monotonic() - start < 25
    finally:
        llm.engine.shutdown()


def test_builtin_smollm2_with_three_ranks_generates_the_same_tokens(builtin_checkpoint: Path) -> None:
    # SmolLM2: 9 heads, 3 KV heads, vocabulary 49152 -> 3, 1 and 16384 per rank.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_tokens=24, temperature=0)
    (expected,) = LLM(str(builtin_checkpoint)).chat(messages, params)
    llm = LLM(str(builtin_checkpoint), tp_size=3)
    try:
        (got,) = llm.chat(messages, params)
    finally:
        llm.engine.shutdown()
    assert got.token_ids == expected.token_ids and "Paris" in got.text
