"""On a GPU: an engine built there carries its compiled kernels, and the runtime's measured memory matches the plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.build.stage import BuildSpec, build
from kiln.models.loader import load_model
from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.kv_sizing import measure_activation_peak

ONE_B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=4096,
)  # fmt: skip


def within(measured: int, planned: int, tolerance: float = 0.10) -> bool:
    return abs(measured - planned) <= tolerance * planned


@pytest.mark.gpu
def test_runtime_memory_matches_the_plan(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**ONE_B)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "checkpoint")
    del model
    torch.cuda.empty_cache()
    spec = BuildSpec(
        source=tmp_path / "checkpoint", output=tmp_path / "engine", max_batch_size=64, max_num_tokens=4096,
        max_seq_len=2048, cuda_graph_batch_sizes=(1, 2, 4, 8),
    )  # fmt: skip
    plan, artifact = build(spec)
    assert artifact.manifest.extra["kernel_cache"]["files"] > 0  # built on its own GPU: kernels travel with it
    memory = plan.memory
    model, _ = load_model(tmp_path / "engine", device="cuda")  # measured alone: the engine fills the GPU
    peak = measure_activation_peak(model, 4096, 64, torch.device("cuda"))
    assert within(peak, memory.activation_peak_bytes), (peak, memory.activation_peak_bytes)
    del model
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = LLMEngine(tmp_path / "engine", EngineConfig())
    limits = engine.limits
    assert (limits.max_batch_size, limits.max_num_tokens, limits.max_seq_len) == (64, 4096, 2048)
    assert limits.cuda_graph_batch_sizes == (1, 2, 4, 8)
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert within(weights, memory.weight_bytes, 0.01), (weights, memory.weight_bytes)
    assert torch.cuda.memory_allocated() - before >= weights
    block_bytes = engine.runner.attention_layers[0].k_cache[0].numel() * 2 * 2 * 16  # K+V, 2 bytes, 16 layers
    assert block_bytes == memory.kv_bytes_per_token * 16
    assert within(limits.num_kv_blocks, memory.num_kv_blocks), (limits.num_kv_blocks, memory.num_kv_blocks)
