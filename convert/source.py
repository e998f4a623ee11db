"""What a conversion source offers, and how a SRC argument picks one."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln.core.builtin_models import is_builtin, resolve_builtin
from kiln.core.errors import SourceError
from kiln.core.hf_checkpoint import PICKLE_REFUSAL, PICKLE_SUFFIXES
from kiln.core.manifest import ParentRef


class ConversionSource(Protocol):
    """A model in some foreign layout that `kiln convert` can stream into a checkpoint artifact."""

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face config.json content, with `architectures` set."""
        ...

    def source_dtype(self) -> str:
        """bf16/fp16/fp32: what `--dtype auto` resolves to for this source."""
        ...

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face tensor name, tensor), one at a time, in a stable order."""
        ...

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """Write tokenizer files (and chat template) into out_dir; returns the names written."""
        ...

    def generation_config(self) -> dict[str, Any] | None:
        """generation_config.json content, or None if the source has none."""
        ...

    def parent(self) -> ParentRef:
        """Where this source came from, with its digest."""
        ...


def open_source(source: str) -> ConversionSource:
    """Choose the reader for a SRC argument: builtin:NAME, a .gguf file, or a model directory."""
    # Imported here: each reader pulls in heavy modules only the chosen one needs.
    from kiln.convert.gguf_file import GGUFSource
    from kiln.convert.hf_dir import HFDirSource

    if is_builtin(source):
        return GGUFSource(resolve_builtin(source), parent_kind=source)
    path = Path(source)
    if not path.exists():
        raise SourceError(f"source {source} does not exist (expected a model directory, a .gguf file or builtin:NAME)")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return GGUFSource(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise SourceError(PICKLE_REFUSAL.format(files=path.name))
        raise SourceError(f"source file {path.name} is neither a .gguf file nor a model directory")
    return HFDirSource(path)
