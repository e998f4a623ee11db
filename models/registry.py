"""Which model class implements each Hugging Face architecture name."""

from __future__ import annotations

from torch import nn

from kiln.core.errors import UnsupportedArchitectureError
from kiln.models.llama import LlamaForCausalLM

# config.json "architectures"[0] -> implementing class. The Llama family shares one implementation;
# the differences (biases, tied embeddings, sliding window, rope scaling) live in ModelConfig.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(MODEL_CLASSES)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class implementing `architecture`; raises UnsupportedArchitectureError naming the supported."""
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; kiln implements {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None
