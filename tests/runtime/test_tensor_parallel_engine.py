"""The engine with tensor-parallel worker processes (CPU, gloo): same tokens as one rank; a dead worker is an error."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.tp_workers import TensorParallelError

PROMPTS = [[1, 5, 9, 77, 3, 250, 6], [1, 200, 31], list(range(40, 71))]


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_greedy_tokens_and_prompt_logprobs_equal_one_rank(serve_checkpoint: Path, tp_size: int) -> None:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    expected = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64).generate(PROMPTS, params)
    llm = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64, tp_size=tp_size)
    try:
        got = llm.generate(PROMPTS, params)
    finally:
        llm.engine.shutdown()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    for ours, theirs in zip(got, expected):
        for a, b in zip(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_a_killed_worker_ends_the_run_with_an_error(serve_checkpoint: Path) -> None:
    llm = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64, tp_size=2, tp_timeout_s=20)
    try:
        (worker,) = llm.engine.tp_workers.processes
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
