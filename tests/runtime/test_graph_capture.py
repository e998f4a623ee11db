"""What the engine captures at start (runtime/graph_capture.py), with the captures themselves stubbed (no GPU)."""

from types import SimpleNamespace

import pytest
import torch

from kiln.runtime import graph_capture
from kiln.runtime.engine_limits import EngineLimits

LIMITS = EngineLimits(
    max_batch_size=96, max_num_tokens=512, max_seq_len=1000, block_size=16, num_kv_blocks=4000,
    attention_backend="triton", device="cuda", dtype="bf16", kv_cache_dtype="bf16",
)  # fmt: skip


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list:
    calls = []

    def decode(model, spec, device):
        calls.append(("decode", spec))
        return SimpleNamespace(bucket_sizes=list(spec.bucket_sizes), pool="pool")

    def mixed(model, max_num_tokens, max_batch_size, max_blocks_per_seq, pool):
        calls.append(("mixed", (max_num_tokens, max_batch_size, max_blocks_per_seq, pool)))
        return "mixed graphs"

    monkeypatch.setattr(graph_capture, "capture_decode_graphs", decode)
    monkeypatch.setattr(graph_capture, "capture_mixed_graphs", mixed)
    return calls


def test_one_gpu_captures_decode_then_prompt_steps_in_one_pool(captured: list, monkeypatch) -> None:
    monkeypatch.delenv("KILN_MIXED_STEP_GRAPHS", raising=False)
    decode, mixed, limits = graph_capture.capture_engine_graphs(None, LIMITS, None, 1, None, torch.device("cuda"))
    spec = captured[0][1]
    assert spec.bucket_sizes[-1] == 96 and spec.max_blocks_per_seq == 63 and spec.capture_seq_len == 1000
    assert captured[1] == ("mixed", (512, 96, 63, "pool")) and mixed == "mixed graphs"
    assert limits.cuda_graph_batch_sizes == spec.bucket_sizes and limits.max_num_tokens == 512


def test_other_ranks_get_the_spec_and_no_prompt_step_graphs(captured: list, monkeypatch) -> None:
    sent = []
    _, mixed, limits = graph_capture.capture_engine_graphs(None, LIMITS, (1, 2, 8), 2, sent.append, "cuda")
    assert sent == [captured[0][1]] and sent[0].bucket_sizes == (1, 2, 8) and mixed is None
    assert [name for name, _ in captured] == ["decode"] and limits.cuda_graph_batch_sizes == (1, 2, 8)
    captured.clear()
    monkeypatch.setenv("KILN_MIXED_STEP_GRAPHS", "0")  # one GPU, switched off
    assert graph_capture.capture_engine_graphs(None, LIMITS, None, 1, None, "cuda")[1] is None
    assert [name for name, _ in captured] == ["decode"]
    # Pipeline stages replay per micro-batch: buckets up to the rows of one of pp_size micro-batches.
    assert captured[0][1].bucket_sizes[-1] == 96
    captured.clear()
    graph_capture.capture_engine_graphs(None, LIMITS, None, 2, sent.append, "cuda")
    assert captured[0][1].bucket_sizes[-1] == 48
