"""Text data for calibration and evaluation: the built-in texts, a .txt file or a JSONL file, cut into windows.

The built-in texts were written for this project: `calibration.txt` feeds `kiln quantize`, and `eval.txt`
is held out from it, so that a quantized model is never scored on the text it was calibrated with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kiln.core.errors import UserInputError
from kiln.core.hashing import sha256_bytes

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
BuiltinSplit = Literal["eval", "calibration"]
_DATA_DIR = Path(__file__).parent / "data"
# Separates JSONL records, so that the last word of one record never runs into the first of the next.
_RECORD_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextData:
    """Text to tokenize, where it came from, and the sha256 of the exact bytes it was read from."""

    text: str
    source: str  # "builtin:eval", "builtin:calibration" or the file path
    digest: str  # "sha256:<hex>" of the file's bytes

    @property
    def num_words(self) -> int:
        """Whitespace-separated words in the text."""
        return len(self.text.split())


def builtin_path(split: BuiltinSplit) -> Path:
    """The file of a built-in text: `eval` (held out) or `calibration`."""
    if split not in ("eval", "calibration"):
        raise ValueError(f"unknown built-in text {split!r}")
    return _DATA_DIR / f"{split}.txt"


def load_text(data: str | Path = BUILTIN, builtin: BuiltinSplit = "eval") -> TextData:
    """Read `builtin` (the built-in text named by `builtin`), a .txt file, or JSONL with a `text` per line."""
    if str(data) == BUILTIN:
        path = builtin_path(builtin)
        raw = path.read_bytes()
        return TextData(text=_decode(raw, path), source=f"{BUILTIN}:{builtin}", digest="sha256:" + sha256_bytes(raw))
    path = Path(data)
    if not path.is_file():
        raise UserInputError(f"data file {path} does not exist; pass 'builtin', a .txt file or a .jsonl file")
    raw = path.read_bytes()
    text = _read_jsonl(raw, path) if path.suffix.lower() in (".jsonl", ".ndjson") else _decode(raw, path)
    if not text.strip():
        raise UserInputError(f"data file {path} holds no text")
    return TextData(text=text, source=str(path), digest="sha256:" + sha256_bytes(raw))


def token_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int) -> list[list[int]]:
    """Up to `max_windows` consecutive, non-overlapping windows of exactly `seq_len` token ids.

    Each window starts with the tokenizer's BOS token when it has one (the way the model saw documents
    in training), followed by the next `seq_len - 1` tokens of the text; a tail too short for a whole
    window is dropped, so every window is scored over the same number of positions.
    """
    if seq_len < 2:
        raise UserInputError(f"sequence length must be at least 2 tokens, got {seq_len}")
    if max_windows < 1:
        raise UserInputError(f"max windows must be at least 1, got {max_windows}")
    # verbose=False: the text is longer than the model's context on purpose; it is cut below.
    ids: list[int] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    stride = seq_len - len(bos)
    num_windows = min(len(ids) // stride, max_windows)
    if num_windows == 0:
        raise UserInputError(
            f"the data has {len(ids)} tokens, too few for one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    if num_windows < max_windows:
        logger.info(
            "the data fills %d window(s) of %d tokens, fewer than the %d asked", num_windows, seq_len, max_windows
        )
    return [bos + ids[i * stride : (i + 1) * stride] for i in range(num_windows)]


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"data file {path} is not UTF-8 text: {exc}") from exc


def _read_jsonl(raw: bytes, path: Path) -> str:
    """The `text` fields of a JSONL file, in order, joined by blank lines."""
    texts = []
    for number, line in enumerate(_decode(raw, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserInputError(f"{path}:{number}: each JSONL line needs a string field 'text'")
        texts.append(record["text"])
    return _RECORD_SEPARATOR.join(texts)
