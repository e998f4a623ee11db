"""Tiny random Hugging Face models written by transformers, for tests (imported as `tiny_models`)."""

from pathlib import Path

import torch

TINY_SIZES = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
_TOKENIZER_TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Kiln converts checkpoints, builds engines and serves them over HTTP.",
    "A quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
]


def make_tiny_tokenizer(vocab_size: int):
    """A small byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_TEXT, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return wrapped


def save_tiny_model(
    out_dir: Path,
    architecture: str = "llama",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    seed: int = 0,
    random_biases: bool = False,
    **overrides: object,
) -> Path:
    """Write a tiny random model of a family (llama, mistral, qwen2) with save_pretrained.

    random_biases: transformers initialises biases to zero; this draws them, so a test sees where they go.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(architecture, **{**TINY_SIZES, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if random_biases:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if with_tokenizer:
        make_tiny_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir


def counting_sequence(start: int, stride: int, length: int, vocab_size: int = 320) -> list[int]:
    """start, start + stride, ... modulo the vocabulary: what the trained tiny model learns to continue."""
    return [(start + i * stride) % vocab_size for i in range(length)]


def save_trained_counting_model(out_dir: Path, device: str, steps: int = 400, seed: int = 0) -> Path:
    """The tiny Llama trained to continue arithmetic sequences (stride 1-4): confident greedy tokens.

    Random tiny models put near-ties among their top logits, where bf16 rounding alone picks another
    token; like a real language model, this one has clear winners, so comparisons in bf16 test the
    engine and not the ties.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **TINY_SIZES)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    for _ in range(steps):
        starts = torch.randint(0, vocab, (64, 1), generator=generator)
        strides = torch.randint(1, 5, (64, 1), generator=generator)
        batch = ((starts + strides * torch.arange(96)) % vocab).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.to(torch.float32).save_pretrained(out_dir)
    return out_dir
