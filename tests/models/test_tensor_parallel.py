"""Tensor parallelism on the CPU with gloo: every rank's shard together gives the single-rank logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import save_tiny_model
from tp_worker import run_rank, single_rank_logits

CASES = [
    ("llama", {}, 2),  # GQA: 4 heads, 2 KV heads -> one KV head per rank
    ("llama", {}, 4),  # fewer KV heads than ranks: each KV head replicated on 2 ranks
    ("qwen2", {}, 2),  # q/k/v biases split with their rows
    # o_proj and down_proj biases: added once (by rank 0) to the partial sums the next norm adds up
    ("llama", {"attention_bias": True, "mlp_bias": True, "random_biases": True}, 2),
    ("llama", {"tie_word_embeddings": True, "vocab_size": 321}, 2),  # tied, vocabulary padded to 2 x 161
]


@pytest.mark.parametrize("architecture,overrides,world_size", CASES)
def test_tp_logits_equal_single_rank(tmp_path: Path, architecture, overrides, world_size) -> None:
    model_dir = save_tiny_model(tmp_path / "model", architecture, with_tokenizer=False, **overrides)
    expected = single_rank_logits(model_dir)
    out = tmp_path / "logits.pt"
    mp.spawn(run_rank, args=(world_size, str(tmp_path / "init"), str(model_dir), str(out)), nprocs=world_size)
    got = torch.load(out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
