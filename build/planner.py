"""The memory planner: what an engine needs on its target GPU, computed before any work is done.

From the model config, its quantization and the target it computes, per tensor-parallel rank:
weight bytes, the activation peak of the largest step, KV bytes per token, the KV blocks that fit,
and the concurrency that leaves at `max_seq_len`. An impossible plan is refused with the numbers
and what to change. With pipeline stages every stage is planned for its own layers (the first also
holds the embedding, the last the head) and the plan is the stage that fits the fewest KV blocks:
every stage allocates the block count rank 0 decides. The runtime measures the same quantities on a
GPU (runtime/kv_sizing.py); a GPU test holds the two within 10%.

Activation peak of one step of T tokens (b bytes per activation), the MLP being the largest part:
residual and normed hidden states (2 T h), the fused gate/up output (2 T I), SiLU(gate) and its
product with up (2 T I), so T b (2 h + 4 I); plus the logits of up to max_batch_size rows, in the
activations' dtype and in fp32 (R V (b + 4)). INT4 layers past 16 rows dequantize their weight into
a temporary 16-bit copy: the largest layer's weight is added.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from kiln.core.errors import UserInputError
from kiln.core.gpu_targets import GIB, GpuTarget
from kiln.models.config import ModelConfig
from kiln.models.parallel import check_tensor_parallel_size
from kiln.models.pipeline import stage_layers
from kiln.models.quant_config import QuantConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# CUDA context, cuBLAS workspaces, CUDA-graph pools and allocator slack that no tensor accounts for.
GPU_RESERVED_BYTES = GIB // 2


@dataclass(frozen=True)
class PlanRequest:
    """The options the plan is made for (already resolved: no None, no auto)."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    dtype: str  # weights and activations: bf16 | fp16 | fp32
    kv_cache_dtype: str  # bf16 | fp16 | fp32 | fp8
    block_size: int
    kv_cache_memory_fraction: float
    tp_size: int
    pp_size: int = 1


@dataclass(frozen=True)
class MemoryPlan:
    """The numbers an engine is built with; all byte counts are per rank (the binding stage's, with stages)."""

    target: str
    memory_bytes: int
    weight_bytes: int
    activation_peak_bytes: int
    reserved_bytes: int
    kv_bytes_per_token: int
    kv_budget_bytes: int
    num_kv_blocks: int  # including the null block 0
    max_concurrency: float  # sequences of max_seq_len the KV cache holds at once
    stage: int = 0  # with pipeline stages: the stage these numbers are for (the one with the fewest blocks)

    def to_dict(self) -> dict[str, Any]:
        """For the manifest and --json."""
        return asdict(self)


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """HF-named projections of one decoder layer: name -> (out, in, shards fused with it)."""
    h, d = config.hidden_size, config.head_dim
    heads, kv_heads, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    return {
        "self_attn.q_proj": (heads * d, h, 3),
        "self_attn.k_proj": (kv_heads * d, h, 3),
        "self_attn.v_proj": (kv_heads * d, h, 3),
        "self_attn.o_proj": (h, heads * d, 1),
        "mlp.gate_proj": (inter, h, 2),
        "mlp.up_proj": (inter, h, 2),
        "mlp.down_proj": (h, inter, 1),
    }


def linear_weight_bytes(algo: str | None, out_features: int, in_features: int, group_size: int, act_bytes: int) -> int:
    """Bytes of one linear layer's weight in the runtime (bias not included)."""
    if algo is None:
        return out_features * in_features * act_bytes
    if algo == "FP8":  # E4M3 weight + fp32 weight_scale and input_scale
        return out_features * in_features + 2 * 4
    # W4A16: two int4 per byte, fp32 group scales, a pre_quant_scale in the activations' dtype
    return out_features * in_features // 2 + out_features * (in_features // group_size) * 4 + in_features * act_bytes


def weight_bytes(
    config: ModelConfig, quant: QuantConfig | None, dtype: str, tp_size: int, stage: int = 0, pp_size: int = 1
) -> int:
    """Weight bytes per rank: every tensor but the norms is split across the tensor-parallel ranks, and a
    pipeline stage holds its layers, plus the embedding (first) and the final norm and head (last)."""
    b = DTYPE_BYTES[dtype]
    layers = stage_layers(config.num_layers, stage, pp_size)
    first, last = stage == 0, stage == pp_size - 1
    table = config.vocab_size * config.hidden_size * b
    if pp_size == 1:
        sharded = table * (1 if config.tie_word_embeddings else 2)
    else:  # the embedding on the first stage, the head on the last (a tied head keeps its own copy of the table)
        sharded = table * (int(first) + int(last))
    for layer in layers:
        for name, (out_features, in_features, _) in linear_shapes(config).items():
            hf_name = f"model.layers.{layer}.{name}"
            algo = quant.algo_for(hf_name) if quant else None
            group = quant.group_size_for(hf_name) if quant else 0
            sharded += linear_weight_bytes(algo, out_features, in_features, group, b)
            if _has_bias(config, name):
                sharded += out_features * b
        if quant is not None and quant.kv_cache_quant_algo:
            sharded += 2 * 4  # k_scale, v_scale
    replicated = (2 * len(layers) + int(last)) * config.hidden_size * b  # RMSNorm weights
    return math.ceil(sharded / tp_size) + replicated


def _has_bias(config: ModelConfig, name: str) -> bool:
    if name == "self_attn.o_proj":
        return config.o_proj_bias
    return config.attention_bias if name.startswith("self_attn") else config.mlp_bias


def activation_peak_bytes(config: ModelConfig, quant: QuantConfig | None, request: PlanRequest) -> int:
    """The largest step's activations per rank (see the module docstring for the terms)."""
    b = DTYPE_BYTES[request.dtype]
    tokens, tp = request.max_num_tokens, request.tp_size
    mlp = tokens * b * (2 * config.hidden_size + 4 * config.intermediate_size // tp)
    logits = request.max_batch_size * math.ceil(config.vocab_size / tp) * (b + 4)
    dequantized = 0
    if quant is not None and request.max_num_tokens > 16 and "W4A16_AWQ" in quant.algos():
        largest = max(o * i * s for o, i, s in linear_shapes(config).values() if s > 1)  # a fused layer
        dequantized = largest * b // tp
    return mlp + logits + dequantized


def kv_bytes_per_token(config: ModelConfig, kv_cache_dtype: str, tp_size: int, num_layers: int | None = None) -> int:
    """Keys and values of one token over all layers (or `num_layers`), per rank (KV heads split, or replicated)."""
    kv_heads_per_rank = max(1, config.num_kv_heads // tp_size)
    layers = config.num_layers if num_layers is None else num_layers
    return 2 * layers * kv_heads_per_rank * config.head_dim * DTYPE_BYTES[kv_cache_dtype]


def plan_memory(config: ModelConfig, quant: QuantConfig | None, target: GpuTarget, request: PlanRequest) -> MemoryPlan:
    """The plan, or a UserInputError naming the numbers and what to change when it cannot work."""
    _check_request(config, target, request)
    stages = [_plan_stage(config, quant, target, request, stage) for stage in range(request.pp_size)]
    return min(stages, key=lambda plan: plan.num_kv_blocks)


def _plan_stage(
    config: ModelConfig, quant: QuantConfig | None, target: GpuTarget, request: PlanRequest, stage: int
) -> MemoryPlan:
    weights = weight_bytes(config, quant, request.dtype, request.tp_size, stage, request.pp_size)
    num_layers = len(stage_layers(config.num_layers, stage, request.pp_size))
    per_token = kv_bytes_per_token(config, request.kv_cache_dtype, request.tp_size, num_layers)
    block_bytes = per_token * request.block_size
    blocks_per_seq = math.ceil(request.max_seq_len / request.block_size)
    if target.is_cpu:  # the CPU runtime: as many blocks as the batch needs, capped (runtime/kv_sizing.py)
        activation, reserved = 0, 0
        budget = min(target.memory_bytes, blocks_per_seq * request.max_batch_size * block_bytes)
    else:
        activation, reserved = activation_peak_bytes(config, quant, request), GPU_RESERVED_BYTES
        usable = int(target.memory_bytes * request.kv_cache_memory_fraction)
        if weights + activation + reserved > usable:
            raise UserInputError(
                f"the weights need {weights / GIB:.1f} GiB per GPU and the activations {activation / GIB:.1f} GiB, "
                f"but {request.kv_cache_memory_fraction:.0%} of the {target.name}'s {target.memory_bytes / GIB:.1f} "
                f"GiB is {usable / GIB:.1f} GiB: raise --tp-size, quantize to fp8 or int4, or lower --max-num-tokens"
            )
        budget = usable - weights - activation - reserved
    num_blocks = budget // block_bytes
    if num_blocks < blocks_per_seq:
        fits = num_blocks * request.block_size
        needed = blocks_per_seq * block_bytes
        raise UserInputError(
            f"one sequence of --max-seq-len {request.max_seq_len} needs {needed / GIB:.2f} GiB of "
            f"KV cache, but {budget / GIB:.2f} GiB is left after weights and activations ({fits} tokens): lower "
            f"--max-seq-len to {fits} or less, use --kv-cache-dtype fp8, or raise --tp-size"
        )
    return MemoryPlan(
        target=target.name,
        memory_bytes=target.memory_bytes,
        weight_bytes=weights,
        activation_peak_bytes=activation,
        reserved_bytes=reserved,
        kv_bytes_per_token=per_token,
        kv_budget_bytes=budget,
        num_kv_blocks=num_blocks + 1,
        max_concurrency=round(num_blocks / blocks_per_seq, 2),
        stage=stage,
    )


def _check_request(config: ModelConfig, target: GpuTarget, request: PlanRequest) -> None:
    if request.max_seq_len > config.max_position_embeddings:
        raise UserInputError(
            f"--max-seq-len {request.max_seq_len} exceeds the model's context of {config.max_position_embeddings}"
        )
    if request.kv_cache_dtype == "fp8" and not (target.fp8 or target.is_cpu):
        raise UserInputError(f"--kv-cache-dtype fp8 needs FP8 support, which the {target.name} ({target.arch}) lacks")
    if request.tp_size < 1:
        raise UserInputError(f"--tp-size must be a positive integer, got {request.tp_size}")
    check_tensor_parallel_size(config.num_heads, config.num_kv_heads, config.intermediate_size, request.tp_size)
    if request.pp_size < 1:
        raise UserInputError(f"--pp-size must be a positive integer, got {request.pp_size}")
    stage_layers(config.num_layers, 0, request.pp_size)  # refuses more stages than layers
    if request.max_num_tokens < request.max_batch_size:
        raise UserInputError(
            f"--max-num-tokens {request.max_num_tokens} is below --max-batch-size {request.max_batch_size}: "
            "every running sequence needs a token of budget per step"
        )
