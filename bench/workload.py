"""Benchmark workloads: synthetic token ids, JSONL prompt files and ShareGPT files; seeded, with a digest.

Synthetic requests are token ids drawn uniformly from the vocabulary (above its first 1000 ids,
where special tokens usually sit), with fixed lengths or lengths drawn from a normal distribution
whose standard deviation is `len_std` times the mean (clipped to [1, 2 x mean]). The same seed gives
the same token ids; the digest (sha256 over the requests) goes into every report.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.errors import UserInputError

SPECIAL_ID_FLOOR = 1000


@dataclass(frozen=True)
class BenchRequest:
    """One request: prompt token ids and the number of tokens to generate."""

    prompt_token_ids: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class Workload:
    """The requests of a run and how they were made."""

    requests: tuple[BenchRequest, ...]
    source: dict[str, Any]  # kind, lengths, seed, file

    @property
    def digest(self) -> str:
        data = json.dumps([[list(r.prompt_token_ids), r.output_len] for r in self.requests], separators=(",", ":"))
        return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def _lengths(rng: np.random.Generator, mean: int, len_std: float, count: int) -> list[int]:
    if len_std <= 0:
        return [mean] * count
    drawn = rng.normal(mean, len_std * mean, size=count)
    return [int(v) for v in np.clip(np.rint(drawn), 1, 2 * mean)]


def synthetic(
    num_requests: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0, len_std: float = 0.0
) -> Workload:
    """Random-token prompts of `input_len` tokens each asking for `output_len` tokens (± len_std)."""
    if num_requests < 1 or input_len < 1 or output_len < 1:
        raise UserInputError("--num-requests, --input-len and --output-len must be positive")
    if len_std < 0:
        raise UserInputError(f"--len-std must be >= 0 (a fraction of the mean length), got {len_std}")
    rng = np.random.default_rng(seed)
    inputs = _lengths(rng, input_len, len_std, num_requests)
    outputs = _lengths(rng, output_len, len_std, num_requests)
    low = SPECIAL_ID_FLOOR if vocab_size > 2 * SPECIAL_ID_FLOOR else 1
    requests = tuple(
        BenchRequest(tuple(int(t) for t in rng.integers(low, vocab_size, size=n)), m) for n, m in zip(inputs, outputs)
    )
    source = {"kind": "synthetic", "input_len": input_len, "output_len": output_len, "len_std": len_std, "seed": seed}
    return Workload(requests, source)


def from_jsonl(path: Path, tokenizer: Any, output_len: int, num_requests: int | None = None) -> Workload:
    """One request per line: {"prompt": text} or {"prompt_token_ids": [...]}, optional "output_len"."""
    requests = []
    for number, line in enumerate(_read_lines(path), start=1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
        ids = item.get("prompt_token_ids") if isinstance(item, dict) else None
        if ids is None and isinstance(item, dict) and isinstance(item.get("prompt"), str):
            ids = _encode(tokenizer, item["prompt"], path)
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise UserInputError(f'{path}:{number}: give "prompt" (text) or "prompt_token_ids" (a list of ints)')
        requests.append(BenchRequest(tuple(ids), int(item.get("output_len") or output_len)))
    return Workload(tuple(requests[:num_requests]), {"kind": "jsonl", "file": str(path), "output_len": output_len})


def from_sharegpt(path: Path, tokenizer: Any, num_requests: int, seed: int = 0) -> Workload:
    """ShareGPT conversations: the first human turn is the prompt, the reply's token count the output length."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read ShareGPT file {path}: {exc}") from exc
    pairs = []
    for entry in data if isinstance(data, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    if not pairs:
        raise UserInputError(f"{path} holds no ShareGPT conversations (a list of {{'conversations': [...]}})")
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        prompt_ids, reply_ids = _encode(tokenizer, prompt, path), _encode(tokenizer, reply, path)
        if len(prompt_ids) >= 4 and len(reply_ids) >= 4:  # vLLM's filter: drop near-empty turns
            requests.append(BenchRequest(tuple(prompt_ids), len(reply_ids)))
        if len(requests) == num_requests:
            break
    return Workload(tuple(requests), {"kind": "sharegpt", "file": str(path), "seed": seed})


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read {path}: {exc}") from exc


def _encode(tokenizer: Any, text: str, path: Path) -> list[int]:
    if tokenizer is None:
        raise UserInputError(f"{path} has text prompts, but the model has no tokenizer")
    return list(tokenizer(text).input_ids)
