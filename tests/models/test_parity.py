"""Forward parity with transformers on tiny random models: packed prefill and paged decode."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.attention import AttentionMetadata
from kiln.models.config import ModelConfig
from kiln.models.layers import Attention
from kiln.models.loader import load_model
from kiln.models.rotary import compute_inv_freq, default_inv_freq

BLOCK_SIZE = 4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@torch.inference_mode()
def hf_logits(hf_model, token_ids: torch.Tensor) -> torch.Tensor:
    """[n] ids -> HF logits [n, vocab] of one sequence run alone."""
    return hf_model(token_ids[None]).logits[0].float()


@torch.inference_mode()
def test_prefill_matches_transformers(case, hf_checkpoint):
    hf_model, path = hf_checkpoint(case)
    model, config = load_model(path, dtype=torch.float32)
    assert config.num_parameters() == sum(p.numel() for p in hf_model.parameters())

    seq_lens = [5, 11, 8]  # longer than the sliding windows of the *_swa cases
    generator = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=generator) for n in seq_lens]
    input_ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    metadata = AttentionMetadata.for_prefill(seq_lens, "cpu")

    logits = model.compute_logits(model(input_ids, positions, metadata))

    assert logits.shape == (sum(seq_lens), config.vocab_size) and logits.dtype == torch.float32
    ref = torch.cat([hf_logits(hf_model, s) for s in seqs])
    assert relative_error(logits, ref) < 1e-4


@pytest.mark.parametrize("case", ["llama3_rope", "linear_rope", "yarn_rope"])
def test_scaled_rope_cases_really_scale(case, hf_config_dict):
    """Guard for the parity cases: their rope differs from plain rope, so parity covers the scaling."""
    config = ModelConfig.from_hf_config(hf_config_dict(case))
    assert config.rope_scaling["rope_type"] == case.split("_")[0]
    inv_freq, scaling = compute_inv_freq(config)
    plain = default_inv_freq(config.head_dim, config.rope_theta)
    assert not torch.allclose(inv_freq, plain)
    assert (scaling != 1.0) == (case == "yarn_rope")


def attach_kv_caches(model, config: ModelConfig, num_blocks: int) -> None:
    """Give every attention layer paged caches, filled with NaN so reading an unwritten slot shows."""
    shape = (num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    for module in model.modules():
        if isinstance(module, Attention):
            module.k_cache = torch.full(shape, float("nan"))
            module.v_cache = torch.full(shape, float("nan"))


def slots_of(block_table: list[int], start: int, end: int) -> list[int]:
    """KV slots of positions [start, end) of a sequence with this block table."""
    return [block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_swa", "qwen2_swa", "smollm_tied_mqa", "llama3_rope"])
@torch.inference_mode()
def test_paged_decode_matches_transformers(case, hf_checkpoint):
    """Chunked prefill, then a mixed step, then one-token decode steps, through non-contiguous blocks."""
    hf_model, path = hf_checkpoint(case)
    model, config = load_model(path, dtype=torch.float32)
    attach_kv_caches(model, config, num_blocks=16)

    generator = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=generator) for n in (11, 9)]
    block_tables = [[7, 2, 9], [5, 12, 3]]  # out of order on purpose
    # Tokens each sequence computes per step: a prefill chunk, a chunk beside a decode, then decodes.
    schedule = [[4, 3], [2, 1]] + [[1, 1]] * 5
    computed = [0, 0]
    logits_per_seq: list[list[torch.Tensor]] = [[], []]
    for query_lens in schedule:
        ids, positions, slots = [], [], []
        for i, n in enumerate(query_lens):
            start, end = computed[i], computed[i] + n
            ids.append(seqs[i][start:end])
            positions.append(torch.arange(start, end))
            slots += slots_of(block_tables[i], start, end)
            computed[i] = end
        metadata = AttentionMetadata.build(
            query_lens=query_lens,
            seq_lens=list(computed),
            device="cpu",
            slot_mapping=slots,
            block_tables=block_tables,
        )
        logits = model.compute_logits(model(torch.cat(ids), torch.cat(positions), metadata))
        for i, chunk in enumerate(logits.split(query_lens)):
            logits_per_seq[i].append(chunk)

    assert computed == [len(s) for s in seqs]
    for seq, chunks in zip(seqs, logits_per_seq):
        assert relative_error(torch.cat(chunks), hf_logits(hf_model, seq)) < 1e-4
