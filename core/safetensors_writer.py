"""Streaming writer of Hugging Face style (optionally sharded) safetensors checkpoints.

Tensors arrive one at a time and are flushed to a shard whenever the pending bytes would pass
`max_shard_bytes`, so memory stays near one shard instead of the whole model. The result is named
the way `transformers` expects: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.core.hf_checkpoint import INDEX_NAME, SINGLE_FILE_NAME

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Size of a tensor's data in bytes."""
    return tensor.numel() * tensor.element_size()


class ShardedSafetensorsWriter:
    """Accumulates tensors and writes them as safetensors shards, then an index if there are several."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temp shard path, tensor names in it
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; may flush the pending ones to a shard first."""
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != size:
            # A view into a larger buffer: safetensors refuses tensors that share memory, so own it.
            tensor = tensor.clone()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def close(self) -> list[str]:
        """Write the last shard, name the files, write the index; returns the file names written."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            os.replace(self._shards[0][0], self.out_dir / SINGLE_FILE_NAME)
            return [SINGLE_FILE_NAME]
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        names = []
        for index, (temp_path, tensor_names) in enumerate(self._shards, start=1):
            final_name = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(temp_path, self.out_dir / final_name)
            weight_map.update({tensor_name: final_name for tensor_name in tensor_names})
            names.append(final_name)
        index_data = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
        return names + [INDEX_NAME]

    def _flush(self) -> None:
        temp_path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors.partial"
        save_file(self._pending, str(temp_path), metadata={"format": "pt"})
        self._shards.append((temp_path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0
