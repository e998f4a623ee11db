"""A tensor-parallel rank for the TP tests (a module of its own so spawned processes can import it)."""

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
        # Leave together: a rank that exits while its peer is still closing gloo's pairs has aborted the
        # peer's process ("terminate called without an active exception"), a flaky failure seen once.
        dist.barrier()
    finally:
        dist.destroy_process_group()
