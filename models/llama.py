"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 (q/k/v bias) and SmolLM (tied embeddings)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels.attention import AttentionMetadata
from kiln.models.config import ModelConfig
from kiln.models.layers import Attention, RMSNorm, SiluAndMul, silu_fused_into_next_product
from kiln.models.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabEmbedding,
)
from kiln.models.parallel import all_gather_last_dim, partial_sums_left_to_norms
from kiln.models.pipeline import OtherStage, pipeline_stage
from kiln.models.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, rotary embedding, attention, output projection."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.attention_bias,
        )
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, bias=config.o_proj_bias)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = Attention(  # this tensor-parallel rank's heads
            self.q_size // config.head_dim,
            self.kv_size // config.head_dim,
            config.head_dim,
            scale=config.head_dim**-0.5,
            sliding_window=config.layer_sliding_window(layer_idx),
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        attn_metadata: AttentionMetadata,
        reduce: bool = True,
    ) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden] (reduce=False: this TP rank's partial sum of it)."""
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.attn.rotates_with_kv_store(q):
            rotary = (positions, self.rotary_emb.cos_cache, self.rotary_emb.sin_cache)
            return self.o_proj(self.attn(q, k, v, attn_metadata, rotary=rotary), reduce=reduce)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn_metadata), reduce=reduce)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias
        )
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden] (reduce=False: this TP rank's partial sum of it)."""
        gate_up = self.gate_up_proj(x)
        if silu_fused_into_next_product(gate_up):
            return self.down_proj(gate_up, gated=True, reduce=reduce)
        return self.down_proj(self.act_fn(gate_up), reduce=reduce)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the next norm.

    Under tensor parallelism the hidden states between blocks are each rank's partial sums: a norm sums them
    over the ranks (fused with it on GPUs that reach each other's memory), the residual stream stays whole.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
        partial: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this block's mlp output, the residual stream before it), both [num_tokens, hidden].

        partial: hidden_states comes in, and the mlp output goes out, as this rank's partial sum (TP).
        """
        hidden_states, residual = self.input_layernorm(hidden_states, residual, partial=partial)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata, reduce=not partial)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual, partial=partial)
        return self.mlp(hidden_states, reduce=not partial), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (the HF `model.` prefix); a pipeline stage holds only its part."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.stage = pipeline_stage()
        self.stage_layers = self.stage.layers(config.num_layers)
        # The last stage keeps the embedding table too when the LM head is tied to it.
        has_embedding = self.stage.is_first or (self.stage.is_last and config.tie_word_embeddings)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size) if has_embedding else OtherStage()
        rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb) if i in self.stage_layers else OtherStage()
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.stage.is_last else OtherStage()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """[num_tokens] token ids and positions -> final hidden states [num_tokens, hidden]."""
        hidden_states, _ = self.forward_stage(input_ids, positions, attn_metadata)
        return hidden_states

    def forward_stage(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stage's part of forward, as (hidden_states, residual), each [num_tokens, hidden].

        The first stage starts from `input_ids`, the others from the previous stage's (hidden_states,
        residual); the last stage returns the final norm's output. One stage: the whole forward. Under tensor
        parallelism the hidden states a stage sends on are the rank's partial sums (LlamaDecoderLayer): each
        goes to the same TP rank of the next stage, whose first norm sums them.
        """
        partial = partial_sums_left_to_norms()
        if self.stage.is_first:
            hidden_states = self.embed_tokens(input_ids, reduce=not partial)
        for i in self.stage_layers:
            hidden_states, residual = self.layers[i](positions, hidden_states, residual, attn_metadata, partial)
        if self.stage.is_last:
            hidden_states, residual = self.norm(hidden_states, residual, partial=partial)
        return hidden_states, residual


class LlamaForCausalLM(nn.Module):
    """Causal LM head on LlamaModel; serves LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM."""

    # HF weight name part -> (our fused parameter's module name, shard id).
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # HF tensor-name suffix -> ours: ModelOpt stores FP8 KV-cache scales on k_proj / v_proj.
    renamed_suffixes = {"k_proj.k_scale": "attn.k_scale", "v_proj.v_scale": "attn.v_scale"}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied: the logits reuse the embedding table, so there is no lm_head parameter to load.
        # Untied: a table of the embedding's shape and vocabulary split (ranks hold rows of the logits).
        # Under pipeline parallelism only the last stage computes logits.
        if config.tie_word_embeddings:
            self.lm_head = None
        elif self.model.stage.is_last:
            self.lm_head = VocabEmbedding(config.vocab_size, config.hidden_size)
        else:
            self.lm_head = OtherStage()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """[num_tokens] ids and positions -> hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions, attn_metadata)

    def forward_stage(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This pipeline stage's part of forward (see LlamaModel.forward_stage)."""
        return self.model.forward_stage(input_ids, positions, attn_metadata, hidden_states, residual)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> fp32 logits [n, vocab_size]."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = all_gather_last_dim(torch.nn.functional.linear(hidden_states, weight))  # ranks' vocab slices
        return logits[..., : self.config.vocab_size].float()
