"""A tensor-parallel rank for the TP tests (a module of its own so spawned processes can import it)."""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PROMPTS = [[1, 5, 9, 77, 3, 250, 6], [1, 200, 31], list(range(40, 71))]


def single_rank_logits(model_dir: Path) -> torch.Tensor:
    """Logits of PROMPTS from the whole model in this process."""
    from kiln.models.loader import load_model

    model, _ = load_model(model_dir, dtype=torch.float32)
    return _logits(model)


def _logits(model) -> torch.Tensor:
    from kiln.kernels.attention import AttentionMetadata

    ids = torch.tensor([t for p in PROMPTS for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in PROMPTS])
    metadata = AttentionMetadata.for_prefill([len(p) for p in PROMPTS], "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, metadata))


def run_rank(rank: int, world_size: int, init_file: str, model_dir: str, out_file: str) -> None:
    """Load this rank's shard, run PROMPTS with gloo collectives; rank 0 saves the logits."""
    from kiln.models.loader import load_model
    from kiln.models.parallel import set_tensor_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        set_tensor_parallel(rank, world_size, dist.group.WORLD)
        model, _ = load_model(Path(model_dir), dtype=torch.float32)
        logits = _logits(model)
        if rank == 0:
            torch.save(logits, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave_together(init_file, rank, world_size)


def _leave_together(init_file: str, rank: int, world_size: int) -> None:
    """Wait for every rank to be done with gloo (through files, not gloo), then exit without interpreter shutdown.

    A rank exiting while its peer still tore gloo down, or gloo's threads met at interpreter shutdown, aborted
    a finished rank now and then ("terminate called without an active exception", SIGABRT): a flaky failure
    of finished work, seen in about one full run of this file in ten even with a barrier before the destroy.
    """
    Path(f"{init_file}.done{rank}").touch()
    deadline = time.monotonic() + 60
    while not all(Path(f"{init_file}.done{other}").exists() for other in range(world_size)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks did not finish within 60 s")
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
