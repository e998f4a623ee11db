"""Model quality on text: perplexity, and how far a second model's next-token distributions drift from the first's.

Both models run through kiln's own implementation (`load_model`), so a quantized checkpoint is measured
exactly as the runtime will execute it. Several windows are packed into one forward as a flat batch of
independent sequences; logits are materialised a chunk of rows at a time, because a full
[num_tokens, vocab] fp32 block is hundreds of MB for a 50k-token vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.core.dtypes import torch_dtype
from kiln.core.errors import UserInputError
from kiln.core.hf_checkpoint import read_config_json
from kiln.kernels.attention import AttentionMetadata
from kiln.models.config import ModelConfig
from kiln.models.loader import load_model
from kiln.quantize.datasets import BUILTIN, load_text, token_windows

logger = logging.getLogger(__name__)

MAX_BATCH_TOKENS = 4096  # tokens per forward (whole windows; at least one)
_LOGITS_ROWS = 1024  # rows of logits alive at once: [1024, vocab] fp32
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class EvalReport:
    """Perplexity of a model on a text and, with a second model, their KL divergence and top-1 agreement."""

    ppl: float
    ppl_other: float | None  # the compared model's perplexity on the same windows
    kl: float | None  # mean over positions of KL(P_model || P_other), in nats
    top1_agreement: float | None  # fraction of positions where both models' most likely token is the same
    num_tokens: int  # predicted (scored) tokens
    data_digest: str
    seq_len: int
    num_windows: int = 0
    data_source: str = ""

    @property
    def ppl_increase_pct(self) -> float | None:
        """How much higher the other model's perplexity is, in percent of this model's."""
        return None if self.ppl_other is None else (self.ppl_other / self.ppl - 1.0) * 100.0

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON and manifests."""
        return {**dataclasses.asdict(self), "ppl_increase_pct": self.ppl_increase_pct}


@dataclass
class _Totals:
    """Running sums over all scored positions (fp64 on the host, so thousands of chunks add up exactly)."""

    nll: float = 0.0
    nll_other: float = 0.0
    kl: float = 0.0
    num_agree: int = 0
    num_tokens: int = 0


def perplexity(model: nn.Module, windows: list[list[int]]) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of every window."""
    totals = _score(model, None, windows)
    return math.exp(totals.nll / totals.num_tokens)


def compare_logits(model_a: nn.Module, model_b: nn.Module, windows: list[list[int]]) -> tuple[float, float]:
    """(mean KL(P_a || P_b) in nats, top-1 agreement) over every predicting position of every window."""
    totals = _score(model_a, model_b, windows)
    return totals.kl / totals.num_tokens, totals.num_agree / totals.num_tokens


def evaluate(
    model_dir: str | Path,
    data: str | Path = BUILTIN,
    compare_dir: str | Path | None = None,
    seq_len: int = 512,
    max_windows: int = 16,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> EvalReport:
    """Score `model_dir` on `data` (the held-out built-in text by default), and against `compare_dir` if given.

    `dtype` None runs each model in its checkpoint's dtype (fp32 on a CPU without native bf16).
    """
    model_dir = Path(model_dir)
    text = load_text(data, builtin="eval")
    tokenizer = _load_tokenizer(model_dir)
    windows = token_windows(tokenizer, text.text, seq_len, max_windows)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    # Checked from config.json before any weights load: a wrong flag should fail in a second, not a minute.
    config = _check_context(model_dir, seq_len)
    if compare_dir is not None:
        compare_dir = Path(compare_dir)
        other_config = _check_context(compare_dir, seq_len)
        _check_same_vocab(model_dir, config.vocab_size, tokenizer, compare_dir, other_config.vocab_size)
    model, _ = load_model(model_dir, dtype=dtype, device=device)
    other = load_model(compare_dir, dtype=dtype, device=device)[0] if compare_dir is not None else None
    logger.info("scoring %d window(s) of %d tokens from %s", len(windows), seq_len, text.source)
    totals = _score(model, other, windows)
    n = totals.num_tokens
    return EvalReport(
        ppl=math.exp(totals.nll / n),
        ppl_other=math.exp(totals.nll_other / n) if other is not None else None,
        kl=totals.kl / n if other is not None else None,
        top1_agreement=totals.num_agree / n if other is not None else None,
        num_tokens=n,
        data_digest=text.digest,
        seq_len=seq_len,
        num_windows=len(windows),
        data_source=text.source,
    )


@torch.inference_mode()
def _score(model: nn.Module, other: nn.Module | None, windows: list[list[int]]) -> _Totals:
    """Sums of NLL (and, with `other`, KL and top-1 matches) over the positions that predict a token."""
    if not windows or any(len(w) < 2 for w in windows):
        raise UserInputError("scoring needs at least one window of two or more tokens")
    totals = _Totals()
    device = next(model.parameters()).device
    for batch in _batches(windows, MAX_BATCH_TOKENS):
        input_ids = torch.tensor([t for w in batch for t in w], dtype=torch.long, device=device)  # [num_tokens]
        rows, targets = _predicting_rows(batch, input_ids)
        hidden = _forward(model, batch, input_ids)  # [num_tokens, hidden]
        hidden_other = _forward(other, batch, input_ids) if other is not None else None
        for start in range(0, len(rows), _LOGITS_ROWS):
            chunk = rows[start : start + _LOGITS_ROWS]
            target = targets[start : start + _LOGITS_ROWS, None]  # [n, 1]
            logprobs = torch.log_softmax(model.compute_logits(hidden[chunk]), dim=-1)  # [n, vocab] fp32
            totals.nll -= logprobs.gather(-1, target).double().sum().item()
            if hidden_other is not None:
                logprobs_other = torch.log_softmax(other.compute_logits(hidden_other[chunk]), dim=-1)
                totals.nll_other -= logprobs_other.gather(-1, target).double().sum().item()
                # kl_div(input, target) = sum exp(target) * (target - input): KL(P_model || P_other).
                kl = F.kl_div(logprobs_other, logprobs, log_target=True, reduction="none")
                totals.kl += kl.double().sum().item()
                agree = logprobs.argmax(dim=-1) == logprobs_other.argmax(dim=-1)
                totals.num_agree += int(agree.sum().item())
        totals.num_tokens += len(rows)
    return totals


def _batches(windows: list[list[int]], max_batch_tokens: int) -> list[list[list[int]]]:
    """Consecutive groups of windows with at most `max_batch_tokens` tokens each (one window at least)."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    num_tokens = 0
    for window in windows:
        if current and num_tokens + len(window) > max_batch_tokens:
            batches.append(current)
            current, num_tokens = [], 0
        current.append(window)
        num_tokens += len(window)
    batches.append(current)
    return batches


def _predicting_rows(batch: list[list[int]], input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-batch rows whose logits predict a token inside their window, and those tokens."""
    rows, offset = [], 0
    for window in batch:
        rows.append(torch.arange(offset, offset + len(window) - 1, device=input_ids.device))
        offset += len(window)
    row_index = torch.cat(rows)  # [num_scored]: every position but each window's last
    return row_index, input_ids[row_index + 1]


def _forward(model: nn.Module, batch: list[list[int]], input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states [num_tokens, hidden] of the windows as independent sequences (no KV cache)."""
    positions = torch.cat([torch.arange(len(w), device=input_ids.device) for w in batch])
    metadata = AttentionMetadata.for_prefill([len(w) for w in batch], input_ids.device)
    return model(input_ids, positions, metadata)


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise UserInputError(f"{model_dir} has no tokenizer files; evaluation needs one to tokenize the text")
    return AutoTokenizer.from_pretrained(str(model_dir))


def _check_context(model_dir: Path, seq_len: int) -> ModelConfig:
    """The model's config, after checking that a window fits its context."""
    config = ModelConfig.from_hf_config(read_config_json(model_dir))
    if seq_len > config.max_position_embeddings:
        raise UserInputError(
            f"--seq-len {seq_len} is longer than {model_dir}'s context of {config.max_position_embeddings} tokens; "
            "pass a smaller one"
        )
    return config


def _check_same_vocab(model_dir: Path, vocab_size: int, tokenizer: Any, other_dir: Path, other_vocab_size: int) -> None:
    """Position-by-position comparison only means something when both models index the same tokens."""
    if vocab_size != other_vocab_size:
        raise UserInputError(
            f"cannot compare {model_dir} (vocabulary of {vocab_size}) with {other_dir} ({other_vocab_size}): "
            "--compare needs two models with the same tokenizer"
        )
    if any((other_dir / name).is_file() for name in _TOKENIZER_FILES):
        if _load_tokenizer(other_dir).get_vocab() != tokenizer.get_vocab():
            raise UserInputError(
                f"cannot compare {model_dir} with {other_dir}: their tokenizers differ; "
                "--compare needs two models with the same tokenizer"
            )
