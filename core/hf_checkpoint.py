"""Reading Hugging Face model directories: config.json and (single or sharded) safetensors weights.

Shared by `convert` (reading foreign directories) and the model loader (reading checkpoints), so
both refuse the same things with the same words.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kiln.core.errors import ConfigError, SourceError

# Files that make a tokenizer and its chat template work with transformers' AutoTokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_REFUSAL = (
    "kiln never loads pickle checkpoints ({files}): unpickling runs arbitrary code. "
    "Convert it to safetensors first in a trusted environment, e.g. "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)"
)


def read_config_json(model_dir: Path) -> dict[str, Any]:
    """Parse config.json, with a clear error for a missing or malformed file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.json; a Hugging Face model directory needs one")
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (a model config), with a clear error when it is not one."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or replace the file") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config


def find_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in index order; pickle-only directories are refused."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(f"{index_path} is malformed ({exc}); it needs a 'weight_map' object") from exc
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise SourceError(f"{index_path.name} lists shard(s) that are missing: {', '.join(missing)}")
        return files
    if (model_dir / SINGLE_FILE_NAME).is_file():
        return [model_dir / SINGLE_FILE_NAME]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(path.name for path in model_dir.iterdir() if path.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise SourceError(PICKLE_REFUSAL.format(files=", ".join(pickles)))
    raise SourceError(f"{model_dir} holds no safetensors weights ({SINGLE_FILE_NAME} or {INDEX_NAME})")


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open on the CPU, with a corrupt or truncated file reported as SourceError naming it."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise SourceError(
            f"{Path(path).name} is not a valid safetensors file ({exc}); re-download or re-save it"
        ) from exc
    with handle as reader:
        yield reader


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, one at a time, in a stable order.

    Tensors may be views of the file's memory map: a consumer that keeps one copies it.
    """
    for path in files:
        with open_safetensors(path) as reader:
            for name in sorted(reader.keys()):
                yield name, reader.get_tensor(name)
