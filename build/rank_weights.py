"""An engine's weight files: for each tensor-parallel rank, the model that rank loads, saved as it holds it.

Each rank's model is built and loaded with the layers' own sharding (models/linear.py), under a
tensor-parallel state of rank r of N that has no process group: loading only reads the rank and the
size, and nothing runs forward here. So a rank's file holds exactly what that rank would hold after
loading the full checkpoint, quantized or not, and loading it later needs no slicing. One rank at a
time, freed before the next, so a build needs the memory of one rank's model (plus one full tensor).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kiln.core.errors import UserInputError
from kiln.models.config import ModelConfig
from kiln.models.engine_weights import write_engine_weights
from kiln.models.parallel import set_tensor_parallel, tensor_parallel

logger = logging.getLogger(__name__)


def write_rank_weights(
    source: Path, out_dir: Path, tp_size: int, dtype: torch.dtype, dummy_weights: bool = False
) -> ModelConfig:
    """Write `rank{r}.safetensors` for r in 0..tp_size-1 into out_dir; returns the model's config."""
    from kiln.models.loader import load_model

    config = None
    # Random weights are drawn on a GPU where there is one: the CPU draws them on one thread (~0.2 GB/s, so
    # ~80 s of an 8B model's build); the file is written from host copies either way.
    device = "cuda" if dummy_weights and torch.cuda.is_available() else "cpu"
    for rank in range(tp_size):
        with _loading_as_rank(rank, tp_size):
            try:
                model, config = load_model(source, dtype=dtype, device=device, dummy_weights=dummy_weights)
            except ValueError as exc:  # a size the layers cannot split evenly over the ranks
                raise UserInputError(f"--tp-size {tp_size}: {exc}") from exc
        path = write_engine_weights(model, out_dir, rank)
        del model  # before the next rank's model is loaded
        if device == "cuda":
            torch.cuda.empty_cache()  # the build's engine start plans its KV cache from the free memory
        logger.info("wrote %s (rank %d of %d)", path.name, rank, tp_size)
    assert config is not None  # tp_size >= 1 (the plan checked it)
    return config


@contextmanager
def _loading_as_rank(rank: int, size: int) -> Iterator[None]:
    """Build and load models as rank `rank` of `size` (no process group), then restore this process's state."""
    previous = tensor_parallel()
    set_tensor_parallel(rank, size)
    try:
        yield
    finally:
        set_tensor_parallel(previous.rank, previous.size, previous.group)
