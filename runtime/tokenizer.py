"""Tokenizer and stop tokens of a model directory, through transformers."""

import json
import logging
from pathlib import Path
from typing import Any

from kiln.core.errors import UserInputError

logger = logging.getLogger(__name__)


def load_tokenizer(model_dir: Path) -> Any:
    """transformers' fast tokenizer for a checkpoint; a clear error when the checkpoint has none."""
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserInputError(f"{model_dir} has no tokenizer files; pass token ids instead of text")
    if (model_dir / "tokenizer.json").is_file():
        # The same tokenizer AutoTokenizer would build from tokenizer.json, without resolving the
        # model's config class first (which imports much of transformers: ~1 s of every start).
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: Path, tokenizer: Any | None) -> list[int]:
    """Token ids that end generation: generation_config.json's eos_token_id(s), else the tokenizer's."""
    ids: list[int] = []
    path = model_dir / "generation_config.json"
    if path.is_file():
        ids += _as_list(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
    if not ids:
        config_path = model_dir / "config.json"
        ids += _as_list(json.loads(config_path.read_text(encoding="utf-8")).get("eos_token_id"))
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
