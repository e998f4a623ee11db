"""The memory planner's arithmetic against numbers worked out by hand, and its refusals."""

from __future__ import annotations

import pytest

from kiln.build.planner import PlanRequest, plan_memory, weight_bytes
from kiln.core.errors import UserInputError
from kiln.core.gpu_targets import GIB, KNOWN_TARGETS, resolve_target
from kiln.models.config import ModelConfig
from kiln.models.quant_config import QuantConfig

LLAMA3_8B = ModelConfig.from_hf_config(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
)
# Per layer: q 4096x4096 + k, v 1024x4096 + o 4096x4096 + gate, up 14336x4096 + down 4096x14336.
LAYER_PARAMS = 16_777_216 + 2 * 4_194_304 + 16_777_216 + 3 * 58_720_256  # 218,103,808
EMBEDDINGS = 2 * 128_256 * 4_096  # embed_tokens + untied lm_head
NORMS = (2 * 32 + 1) * 4_096


def request(**changes) -> PlanRequest:
    base = dict(
        max_batch_size=256, max_num_tokens=8192, max_seq_len=8192, dtype="bf16", kv_cache_dtype="bf16",
        block_size=16, kv_cache_memory_fraction=0.9, tp_size=1,
    )  # fmt: skip
    return PlanRequest(**{**base, **changes})


def test_llama3_8b_bf16_on_h100():
    plan = plan_memory(LLAMA3_8B, None, KNOWN_TARGETS["h100-80gb"], request())
    assert 32 * LAYER_PARAMS + EMBEDDINGS + NORMS == 8_030_261_248  # the published parameter count
    assert plan.weight_bytes == 2 * 8_030_261_248
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 heads of 128, bf16
    # Activations: 8192 tokens x 2 bytes x (2 x 4096 + 4 x 14336), plus 256 rows of logits in bf16 and fp32.
    assert plan.activation_peak_bytes == 8192 * 2 * (2 * 4096 + 4 * 14336) + 256 * 128_256 * (2 + 4)
    memory = int(79.1 * GIB)
    budget = int(memory * 0.9) - 2 * 8_030_261_248 - plan.activation_peak_bytes - GIB // 2
    assert plan.kv_budget_bytes == budget == 58_571_544_002
    assert plan.num_kv_blocks == budget // (131_072 * 16) + 1 == 27_930
    assert plan.max_concurrency == round(27_929 / 512, 2) == 54.55  # 512 blocks per 8192-token sequence


def test_llama3_8b_fp8_with_fp8_kv_on_h200():
    quant = QuantConfig("FP8", kv_cache_quant_algo="FP8")
    plan = plan_memory(LLAMA3_8B, quant, KNOWN_TARGETS["h200"], request(kv_cache_dtype="fp8"))
    # Linear weights 1 byte each + 2 fp32 scales per layer (7 per block), 2 KV scales per block; the rest bf16.
    assert plan.weight_bytes == 2 * EMBEDDINGS + 32 * (LAYER_PARAMS + 7 * 8 + 8) + 2 * NORMS == 9_081_202_688
    assert plan.kv_bytes_per_token == 65_536  # half of bf16
    budget = int(int(139.8 * GIB) * 0.9) - 9_081_202_688 - plan.activation_peak_bytes - GIB // 2
    assert plan.num_kv_blocks == budget // (65_536 * 16) + 1


def test_int4_weights_and_tensor_parallel_split():
    quant = QuantConfig("W4A16_AWQ", group_size=128)
    plan = plan_memory(LLAMA3_8B, quant, KNOWN_TARGETS["h100-80gb"], request(tp_size=2))
    linear = LAYER_PARAMS // 2 + LAYER_PARAMS // 128 * 4  # nibbles + one fp32 scale per 128 weights
    pre_quant = 2 * (3 * 4096 + 4096 + 2 * 4096 + 14336)  # bf16 pre_quant_scale per layer input
    sharded = 2 * EMBEDDINGS + 32 * (linear + pre_quant)
    assert plan.weight_bytes == -(-sharded // 2) + 2 * NORMS
    assert plan.kv_bytes_per_token == 2 * 32 * 4 * 128 * 2  # 4 of the 8 KV heads per rank


def test_pipeline_stages_are_planned_for_their_own_layers_and_the_tightest_wins():
    # 32 layers over 3 stages: 11, 11, 10. Stage 0 holds the embedding, stage 2 the final norm and head.
    table = 128_256 * 4_096 * 2
    stage_weights = [
        11 * LAYER_PARAMS * 2 + table + 2 * 11 * 4_096 * 2,
        11 * LAYER_PARAMS * 2 + 2 * 11 * 4_096 * 2,
        10 * LAYER_PARAMS * 2 + table + (2 * 10 + 1) * 4_096 * 2,
    ]
    assert sum(stage_weights) == 2 * 8_030_261_248  # the stages hold the model once, nothing twice
    target = KNOWN_TARGETS["cpu"]
    plan = plan_memory(LLAMA3_8B, None, target, request(pp_size=3, max_batch_size=32))
    assert plan.stage == 0  # 11 layers of KV per token: the fewest blocks fit in the CPU's cap
    assert plan.weight_bytes == stage_weights[0]
    assert plan.kv_bytes_per_token == 2 * 11 * 8 * 128 * 2
    gpu = plan_memory(LLAMA3_8B, None, KNOWN_TARGETS["h100-80gb"], request(pp_size=3))
    assert gpu.stage == 0 and gpu.weight_bytes == stage_weights[0]  # 11 layers and the table: the tightest
    # A tied head on the last stage needs its own copy of the embedding table: one table more in all.
    tied = ModelConfig.from_hf_config({**_hf(LLAMA3_8B), "tie_word_embeddings": True})
    stages = [weight_bytes(tied, None, "bf16", 1, stage, 2) for stage in range(2)]
    assert sum(stages) == weight_bytes(tied, None, "bf16", 1) + table


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"pp_size": 33}, "exceeds the model's 32 decoder layers"),
        ({"pp_size": 2, "tp_size": 3}, "sizes that do: 1, 2, 4, 8"),
    ],
)
def test_pipeline_refusals(changes, message):
    with pytest.raises(UserInputError, match=message):
        plan_memory(LLAMA3_8B, None, KNOWN_TARGETS["h100-80gb"], request(**changes))


@pytest.mark.parametrize(
    "target,changes,message",
    [
        ("a100-40gb", {}, "raise --tp-size, quantize to fp8 or int4"),
        ("rtx-4090", {"max_seq_len": 131_072}, "lower --max-seq-len to 3"),
        ("a100-80gb", {"kv_cache_dtype": "fp8"}, "lacks"),
        ("h100-80gb", {"max_seq_len": 100_000}, "exceeds the model's context"),
        ("h100-80gb", {"tp_size": 3}, "does not split the model's 32 attention heads and 8 KV heads"),
        ("h100-80gb", {"max_num_tokens": 128}, "below --max-batch-size"),
    ],
)
def test_refusals_name_the_numbers_and_the_fix(target, changes, message):
    config = LLAMA3_8B
    if target == "a100-40gb":  # a 70B-class model: 140 GB of bf16 weights on one 40 GB card
        config = ModelConfig.from_hf_config({**_hf(LLAMA3_8B), "num_hidden_layers": 320})
    if target == "rtx-4090":  # Llama 3.1's 128K context: 16 GiB of bf16 KV for one sequence, ~4.6 GiB left
        config = ModelConfig.from_hf_config({**_hf(LLAMA3_8B), "max_position_embeddings": 131_072})
    with pytest.raises(UserInputError, match=message):
        plan_memory(config, None, KNOWN_TARGETS[target], request(**changes))


def _hf(config: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings, "tie_word_embeddings": False,
    }  # fmt: skip


def test_targets():
    assert resolve_target("h200").arch == "sm90" and resolve_target("a100-80gb").fp8 is False
    with pytest.raises(UserInputError, match="unknown --target-gpu 'h300'"):
        resolve_target("h300")
