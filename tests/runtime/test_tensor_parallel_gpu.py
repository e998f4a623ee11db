"""TP and PP on GPUs (NCCL, a process per GPU): same tokens as one GPU; a dead rank is an error."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_models import counting_sequence, save_tiny_model, save_trained_counting_model

from kiln import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def _needs_gpus(count: int):
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} GPUs")


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Large random weights: decisive enough logits for fp32 runs to agree token for token.
    return save_tiny_model(tmp_path_factory.mktemp("tp-gpu") / "sharp", with_tokenizer=False, initializer_range=0.3)


@pytest.fixture(scope="module")
def counting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Trained, so its greedy tokens have clear winners as a real model's do: bf16 compares without ties.
    return save_trained_counting_model(tmp_path_factory.mktemp("tp-gpu") / "counting", "cuda")


def _random_prompts(count: int = 32) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 90, (count,), generator=generator).tolist()
    return [torch.randint(1, 320, (n,), generator=generator).tolist() for n in lengths]


def _counting_prompts(count: int = 32) -> list[list[int]]:
    return [counting_sequence(11 * i, 1 + i % 4, 4 + (7 * i) % 60) for i in range(count)]


def _token_agreement(got: list[list[int]], expected: list[list[int]]) -> float:
    same = sum(a == b for ours, theirs in zip(got, expected) for a, b in zip(ours, theirs))
    return same / sum(len(theirs) for theirs in expected)


def _one_gpu_outputs(model: Path, prompts, params: SamplingParams, options: dict):
    llm = LLM(str(model), **options)
    outputs = llm.generate(prompts, params)
    del llm
    gc.collect()
    torch.cuda.empty_cache()  # rank 0 shares GPU 0 with this engine's KV cache otherwise
    return outputs


def _tp_outputs(model: Path, prompts, params: SamplingParams, options: dict, tp_size: int, pp_size: int = 1):
    llm = LLM(str(model), tp_size=tp_size, pp_size=pp_size, **options)
    try:
        outputs = llm.generate(prompts, params)
        if options["dtype"] != "fp32":  # the Triton kernels (and so the graphs) run half precision
            assert llm.engine.limits.attention_backend == "triton"
            # Decode steps replayed graphs (holding all-reduces under TP; a stage's part per micro-batch
            # under PP). No reference to the graphs may outlive this line: a captured NCCL kernel keeps the
            # communicator open, and shutdown's destroy would wait.
            assert llm.engine.runner.decode_graphs.num_replays > 0
    finally:
        llm.engine.shutdown()
    return outputs


TP_SIZES = [pytest.param(2, marks=_needs_gpus(2)), pytest.param(4, marks=_needs_gpus(4))]


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_gpu_tp_bf16_greedy_tokens_agree_with_one_gpu(counting_model: Path, tp_size: int) -> None:
    # 4 ranks with 2 KV heads: each KV head is held by two ranks (GQA replication).
    prompts = _counting_prompts()
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    options = {"device": "cuda", "dtype": "bf16", "max_batch_size": 16}
    expected = [r.token_ids for r in _one_gpu_outputs(counting_model, prompts, params, options)]
    got = [r.token_ids for r in _tp_outputs(counting_model, prompts, params, options, tp_size)]
    assert _token_agreement(got, expected) >= 0.99


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_gpu_tp_fp32_tokens_and_prompt_logprobs_equal_one_gpu(sharp_model: Path, tp_size: int) -> None:
    _check_fp32_tokens_and_prompt_logprobs(sharp_model, tp_size=tp_size, pp_size=1)


@_needs_gpus(2)
def test_gpu_pp2_fp32_tokens_and_prompt_logprobs_equal_one_gpu(sharp_model: Path) -> None:
    # Two stages, one layer each: hidden states and logits travel GPU to GPU over NCCL, micro-batches overlap.
    _check_fp32_tokens_and_prompt_logprobs(sharp_model, tp_size=1, pp_size=2)


PIPELINES = [  # (tp_size, pp_size, max_batch_size)
    # 20 sequences a step make micro-batches of 10 rows, padded to the 16-row graph.
    pytest.param(1, 2, 20, marks=_needs_gpus(2), id="pp2"),
    pytest.param(2, 2, 32, marks=_needs_gpus(4), id="tp2-pp2"),
]


@pytest.mark.parametrize("tp_size,pp_size,max_batch_size", PIPELINES)
def test_gpu_pipeline_bf16_greedy_tokens_agree_with_one_gpu(
    counting_model: Path, tp_size: int, pp_size: int, max_batch_size: int
) -> None:
    # Each stage replays its own captured decode graphs (holding its TP all-reduces); the hidden states and
    # residual go to the next stage outside the graphs.
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    options = {"device": "cuda", "dtype": "bf16", "max_batch_size": max_batch_size}
    expected = _one_gpu_outputs(counting_model, _counting_prompts(), params, options)
    got = _tp_outputs(counting_model, _counting_prompts(), params, options, tp_size=tp_size, pp_size=pp_size)
    assert _token_agreement([r.token_ids for r in got], [r.token_ids for r in expected]) >= 0.99


def _check_fp32_tokens_and_prompt_logprobs(model: Path, tp_size: int, pp_size: int) -> None:
    """Parallel ranks against one GPU in fp32 (eager NCCL, PyTorch attention): tokens, prompt logprobs to 1e-3."""
    prompts = _random_prompts()
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, prompt_logprobs=1)
    options = {"device": "cuda", "dtype": "fp32", "max_batch_size": 16}
    expected = _one_gpu_outputs(model, prompts, params, options)
    got = _tp_outputs(model, prompts, params, options, tp_size=tp_size, pp_size=pp_size)
    assert _token_agreement([r.token_ids for r in got], [r.token_ids for r in expected]) >= 0.99
    for ours, theirs in zip(got, expected):
        for a, b in zip(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a)


_KILL_MID_RUN = """
import os, signal, threading, time
from kiln import LLM, SamplingParams
from kiln.runtime.tp_workers import TensorParallelError

# A fixed cache: GPU 0 is shared with the test process, whose engines' memory the planner would count.
llm = LLM({model!r}, device="cuda", dtype="bf16", tp_size=2, tp_timeout_s=20, num_kv_blocks=512)
(worker,) = llm.engine.workers.processes
threading.Timer(3.0, os.kill, (worker.pid, signal.SIGKILL)).start()
prompts = [[1 + i, 2, 3] for i in range(64)]
try:
    while True:  # generate until the kill lands inside a step
        llm.generate(prompts, SamplingParams(max_tokens=200, ignore_eos=True))
except TensorParallelError as exc:
    print("ERROR:", exc, flush=True)
    raise SystemExit(3)
"""


@_needs_gpus(2)
def test_a_worker_killed_mid_step_ends_the_run_with_an_error(sharp_model: Path) -> None:
    # In its own process: a rank 0 blocked inside an NCCL kernel is either released by the abort (an error,
    # exit 3 here) or, failing that, exits itself; either way it must end, with the reason, within the timeout.
    script = textwrap.dedent(_KILL_MID_RUN.format(model=str(sharp_model)))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "stopped; the run cannot go on" in output, output
    assert elapsed < 90, output
