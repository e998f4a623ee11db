"""Reading a Hugging Face model directory (single or sharded safetensors) for conversion."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln.core.artifact import parent_ref_for
from kiln.core.dtypes import KNOWN_DTYPE_SPELLINGS, canonical_dtype_name
from kiln.core.errors import ConfigError
from kiln.core.hf_checkpoint import (
    TOKENIZER_FILES,
    find_weight_files,
    iter_safetensors,
    open_safetensors,
    read_config_json,
)
from kiln.core.manifest import ParentRef


class HFDirSource:
    """A directory written by transformers' save_pretrained (or a kiln checkpoint artifact)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._config = read_config_json(model_dir)
        self.weight_files = find_weight_files(model_dir)
        self._check_headers()

    def hf_config(self) -> dict[str, Any]:
        return dict(self._config)

    def source_dtype(self) -> str:
        declared = str(self._config.get("dtype") or self._config.get("torch_dtype") or "")
        if declared.removeprefix("torch.").lower() in KNOWN_DTYPE_SPELLINGS:
            return canonical_dtype_name(declared)
        return self._first_float_dtype()  # absent or unusual: what the tensors hold decides

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_safetensors(self.weight_files)

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        written = []
        for name in TOKENIZER_FILES:
            if (self.model_dir / name).is_file():
                shutil.copyfile(self.model_dir / name, out_dir / name)
                written.append(name)
        return written

    def generation_config(self) -> dict[str, Any] | None:
        path = self.model_dir / "generation_config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc})") from exc

    def parent(self) -> ParentRef:
        return parent_ref_for(self.model_dir)

    def _check_headers(self) -> None:
        # Opening reads and validates each header: a corrupt or truncated file fails here, before any work.
        for path in self.weight_files:
            with open_safetensors(path):
                pass

    def _first_float_dtype(self) -> str:
        with open_safetensors(self.weight_files[0]) as reader:
            for name in reader.keys():
                dtype = reader.get_slice(name).get_dtype()
                if dtype in ("BF16", "F16", "F32"):
                    return {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}[dtype]
        return "fp32"
