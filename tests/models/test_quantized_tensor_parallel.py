"""Quantized checkpoints (fp8, int4) under tensor parallelism: each rank holds its slice of every tensor.

The tiny Llama: hidden 64, 4 heads and 2 KV heads of 16, intermediate 128. At TP=2 a rank has q rows
[32r, 32r + 32), k and v rows [16r, 16r + 16), and o_proj input columns [32r, 32r + 32). The int4
checkpoints use groups of 16 so that every rank's inputs are whole groups (also at TP=4).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from tp_worker import run_rank, single_rank_logits

from kiln.core.errors import ConfigError
from kiln.models.linear import ColumnParallelLinear
from kiln.models.loader import load_model
from kiln.models.parallel import set_tensor_parallel
from kiln.models.quantized_linear import Int4Linear

FORMATS = ["fp8", "int4-awq", "int4-wo"]
GROUP_SIZE = 16
ATTN = "model.layers.0.self_attn"


@contextmanager
def as_rank(rank: int, size: int) -> Iterator[None]:
    """Build and load as one rank of `size` in this process (no process group: nothing may communicate)."""
    set_tensor_parallel(rank, size)
    try:
        yield
    finally:
        set_tensor_parallel(0, 1)


def load_rank(path: Path, rank: int, size: int = 2):
    with as_rank(rank, size):
        model, _ = load_model(path, dtype=torch.float32)
    return model


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (float8 has no torch.equal on the CPU)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_rank_holds_its_slice_of_every_quantized_tensor(modelopt_checkpoint, fmt: str) -> None:
    path = modelopt_checkpoint(fmt, GROUP_SIZE)
    tensors = checkpoint_tensors(path)
    q, k, v, o = (tensors[f"{ATTN}.{p}_proj.weight"] for p in "qkvo")
    for rank in range(2):
        attn = load_rank(path, rank).model.layers[0].self_attn
        qkv, o_proj = attn.qkv_proj, attn.o_proj
        rows_q = cols = slice(32 * rank, 32 * rank + 32)  # 2 of 4 query heads; half the o_proj inputs
        rows_kv = slice(16 * rank, 16 * rank + 16)  # 1 of 2 KV heads
        if fmt == "fp8":
            assert same(qkv.weight, torch.cat([q[rows_q], k[rows_kv], v[rows_kv]]))
            # Per-tensor scales: every rank keeps each shard's scale whole.
            scales = torch.stack([tensors[f"{ATTN}.{p}_proj.weight_scale"] for p in "qkv"])
            assert torch.equal(qkv.weight_scale, scales)
            assert same(o_proj.weight, o[:, cols].contiguous())
            assert torch.equal(o_proj.weight_scale, tensors[f"{ATTN}.o_proj.weight_scale"].reshape(1))
            assert torch.equal(o_proj.input_scale, tensors[f"{ATTN}.o_proj.input_scale"].reshape(1))
            continue
        # int4: two output rows per packed row; scale rows by output, scale columns by input group.
        packed_q, packed_kv = slice(16 * rank, 16 * rank + 16), slice(8 * rank, 8 * rank + 8)
        assert same(qkv.weight, torch.cat([q[packed_q], k[packed_kv], v[packed_kv]]))
        q_s, k_s, v_s, o_s = (tensors[f"{ATTN}.{p}_proj.weight_scale"] for p in "qkvo")
        assert same(qkv.weight_scale, torch.cat([q_s[rows_q], k_s[rows_kv], v_s[rows_kv]]))
        assert same(o_proj.weight, o[:, cols].contiguous())
        assert o_s.shape == (64, 4) and same(o_proj.weight_scale, o_s[:, 2 * rank : 2 * rank + 2].contiguous())
        if fmt == "int4-awq":
            pre_quant = tensors[f"{ATTN}.o_proj.pre_quant_scale"].float()
            assert torch.equal(o_proj.pre_quant_scale, pre_quant[cols])
        else:
            assert o_proj.pre_quant_scale is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_outputs_make_up_the_one_rank_output(modelopt_checkpoint, fmt: str) -> None:
    # Column-parallel outputs are this rank's columns of the whole; row-parallel partial sums add up to it.
    # On the CPU int4 layers multiply with a cached dequantized weight: it must be the rank's own shard.
    path = modelopt_checkpoint(fmt, GROUP_SIZE)
    torch.manual_seed(0)
    x, h = torch.randn(5, 64), torch.randn(5, 128)
    whole = load_model(path, dtype=torch.float32)[0].model.layers[0]
    ranks = [load_rank(path, rank).model.layers[0] for rank in range(2)]
    with torch.inference_mode():
        qkv = [layer.self_attn.qkv_proj(x) for layer in ranks]  # [5, 32 q + 16 k + 16 v] per rank
        pieces = [part[:, cols] for cols in (slice(0, 32), slice(32, 48), slice(48, 64)) for part in qkv]
        assert torch.equal(torch.cat(pieces, dim=1), whole.self_attn.qkv_proj(x))
        gate_up = [layer.mlp.gate_up_proj(x) for layer in ranks]  # [5, 64 gate + 64 up] per rank
        pieces = [part[:, cols] for cols in (slice(0, 64), slice(64, 128)) for part in gate_up]
        assert torch.equal(torch.cat(pieces, dim=1), whole.mlp.gate_up_proj(x))
        o = sum(layer.self_attn.o_proj.matmul(x[:, 32 * r : 32 * r + 32], None) for r, layer in enumerate(ranks))
        torch.testing.assert_close(o, whole.self_attn.o_proj(x), rtol=1e-5, atol=1e-6)
        down = sum(layer.mlp.down_proj.matmul(h[:, 64 * r : 64 * r + 64], None) for r, layer in enumerate(ranks))
        torch.testing.assert_close(down, whole.mlp.down_proj(h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt,world_size", [("fp8", 2), ("int4-awq", 2), ("int4-wo", 4)])
def test_quantized_tp_logits_equal_single_rank(modelopt_checkpoint, tmp_path: Path, fmt: str, world_size: int) -> None:
    # TP=4: each of the 2 KV heads (and its fp8 scale, its packed int4 rows) replicated on 2 ranks.
    path = modelopt_checkpoint(fmt, GROUP_SIZE)
    expected = single_rank_logits(path)
    out = tmp_path / "logits.pt"
    mp.spawn(run_rank, args=(world_size, str(tmp_path / "init"), str(path), str(out)), nprocs=world_size)
    got = torch.load(out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_int4_groups_split_between_ranks_are_refused(modelopt_checkpoint) -> None:
    # Groups of 128 (down_proj) and 64 (o_proj): each of 2 ranks would get half a group of inputs.
    path = modelopt_checkpoint("int4-wo", 128)
    with pytest.raises(ConfigError, match=r"int4 groups of \d+ input channels do not split .* smaller --group-size"):
        load_rank(path, 0)


def test_odd_int4_outputs_per_rank_are_refused() -> None:
    with as_rank(1, 2), torch.device("meta"):
        base = ColumnParallelLinear(16, 6)  # 3 output channels per rank: not whole bytes
        with pytest.raises(ConfigError, match=r"would get \[3\] output channels each; use a --tp-size"):
            Int4Linear.like(base)
