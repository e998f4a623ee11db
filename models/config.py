"""ModelConfig: the architecture facts kiln needs, parsed and checked from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.core.errors import ConfigError

# Rope types whose inverse frequencies are fixed at load time. "dynamic" and "longrope" change with
# the running sequence length, which a paged, CUDA-graphed runtime cannot follow per step.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}
# Family defaults for fields a config.json may leave out (the values transformers would use).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
}
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model, normalised across config.json versions."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # None for plain rope; else {"rope_type": ..., params...} (no rope_theta)
    attention_bias: bool  # bias on q/k/v projections
    tie_word_embeddings: bool
    sliding_window: int | None  # window size when any layer uses one, else None
    torch_dtype: str | None  # as written in config.json ("bfloat16", ...)
    o_proj_bias: bool = False  # Llama's attention_bias also covers o_proj; Qwen2's q/k/v bias does not
    mlp_bias: bool = False
    # Per-layer "full_attention" / "sliding_attention" (Qwen2 applies its window only to upper layers).
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_hf_config(cls, hf: dict) -> ModelConfig:
        """Parse a config.json dict; raises ConfigError naming the missing or malformed field."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        architecture = _architecture(hf)
        defaults = _FAMILY_DEFAULTS.get(architecture, _FAMILY_DEFAULTS["LlamaForCausalLM"])
        hidden_size = _int(hf, "hidden_size")
        num_heads = _int(hf, "num_attention_heads")
        num_kv_heads = _int(hf, "num_key_value_heads", num_heads)
        num_layers = _int(hf, "num_hidden_layers")
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ConfigError(
                    f"config.json: hidden_size ({hidden_size}) is not a multiple of "
                    f"num_attention_heads ({num_heads}) and no head_dim is given"
                )
            head_dim = hidden_size // num_heads
        else:
            head_dim = _int(hf, "head_dim")
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        max_positions = _int(hf, "max_position_embeddings", defaults["max_position_embeddings"])
        rope_theta, rope_scaling = _parse_rope(hf, max_positions)
        attention_bias, o_proj_bias = _attention_biases(hf, architecture)
        sliding_window, layer_types = _sliding_window(hf, architecture, num_layers)
        dtype = hf.get("dtype", hf.get("torch_dtype"))
        return cls(
            architecture=architecture,
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_int(hf, "intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_float(hf, "rms_norm_eps", defaults["rms_norm_eps"]),
            max_position_embeddings=max_positions,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=attention_bias,
            tie_word_embeddings=_bool(hf, "tie_word_embeddings", False),
            sliding_window=sliding_window,
            torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            o_proj_bias=o_proj_bias,
            mlp_bias=_bool(hf, "mlp_bias", False),
            layer_types=layer_types,
        )

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of one layer, or None for full attention."""
        if self.layer_types and self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None

    def num_parameters(self) -> int:
        """Number of weights in the model (a tied lm_head counted once)."""
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        h, inter = self.hidden_size, self.intermediate_size
        attn = h * (q_size + 2 * kv_size) + q_size * h
        attn += (q_size + 2 * kv_size) * self.attention_bias + h * self.o_proj_bias
        mlp = 3 * h * inter + (2 * inter + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h  # + two RMSNorm weights
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * per_layer + h  # + final norm


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConfigError("config.json: field 'architectures' is missing or is not a list of names")
    return archs[0]


def _int(hf: dict, key: str, default: int | None = None) -> int:
    value = hf.get(key, default)
    if value is None:
        raise ConfigError(f"config.json: required field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: field {key!r} must be a positive integer, got {value!r}")
    return value


def _float(hf: dict, key: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config.json: field {key!r} must be a positive number, got {value!r}")
    return float(value)


def _bool(hf: dict, key: str, default: bool) -> bool:
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: field {key!r} must be true or false, got {value!r}")
    return value


def _attention_biases(hf: dict, architecture: str) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) for the family."""
    if architecture == "Qwen2ForCausalLM":
        return True, False  # Qwen2 always has q/k/v bias and never an o_proj bias
    bias = _bool(hf, "attention_bias", False)
    return bias, bias


def _sliding_window(hf: dict, architecture: str, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(window, per-layer types) honouring each family's switch for sliding-window attention."""
    window = hf.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not _bool(hf, "use_sliding_window", False):
        window = None
    if window is None:
        return None, ("full_attention",) * num_layers
    window = _int(hf, "sliding_window")
    if architecture != "Qwen2ForCausalLM":
        return window, ("sliding_attention",) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None:  # older Qwen2 configs: the window applies from max_window_layers on
        first = hf.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ConfigError(f"config.json: field 'max_window_layers' must be an integer >= 0: {first!r}")
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    known = {"sliding_attention", "full_attention"}
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or set(layer_types) - known:
        raise ConfigError(f"config.json: field 'layer_types' must list {num_layers} entries of {sorted(known)}")
    return window, tuple(layer_types)


def _parse_rope(hf: dict, max_positions: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5 `rope_parameters` or older `rope_scaling`."""
    key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: field {key!r} must be an object, got {params!r}")
    if any(isinstance(value, dict) for value in params.values()):
        raise ConfigError(f"config.json: per-layer-type {key!r} is not supported for this family")
    theta = params.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: field 'rope_theta' must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ConfigError(
            f"config.json: {key}.rope_type {rope_type!r} is not supported; supported: "
            f"{', '.join(STATIC_ROPE_TYPES)} ('dynamic' and 'longrope' depend on the running length)"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json: {key}.partial_rotary_factor is not supported for this family")
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = rope_type
    for name in _ROPE_REQUIRED_KEYS[rope_type]:
        if not isinstance(scaling.get(name), (int, float)) or isinstance(scaling.get(name), bool):
            raise ConfigError(f"config.json: {key}.{name} is required for rope_type {rope_type!r}")
    if rope_type in ("llama3", "yarn"):
        # Same precedence as transformers: a top-level original_max_position_embeddings wins.
        original = hf.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings"))
        scaling["original_max_position_embeddings"] = original if original is not None else max_positions
    return float(theta), scaling
