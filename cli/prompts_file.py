"""Prompts from a file: plain text (one prompt per line) or JSONL (`prompt` or `messages` per line)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.core.errors import UserInputError


@dataclass(frozen=True)
class PromptItem:
    """One prompt: text, or a chat conversation."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None


def read_prompts_file(path: Path) -> list[PromptItem]:
    """Read prompts; a .jsonl file is JSON lines, anything else one prompt per non-empty line."""
    if not path.is_file():
        raise UserInputError(f"prompts file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return [_json_item(line, path, number) for number, line in enumerate(lines, start=1) if line.strip()]
    return [PromptItem(text=line) for line in lines if line.strip()]


def _json_item(line: str, path: Path, number: int) -> PromptItem:
    where = f"{path}:{number}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{where} is not valid JSON ({exc.msg})") from exc
    if isinstance(data, dict) and isinstance(data.get("prompt"), str):
        return PromptItem(text=data["prompt"])
    messages = data.get("messages") if isinstance(data, dict) else None
    if (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        return PromptItem(messages=messages)
    raise UserInputError(f'{where}: each line needs "prompt": "text" or "messages": [{{"role": ..., "content": ...}}]')
