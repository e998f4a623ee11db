"""Ranks started by `torchrun` (one process per GPU, on one node or several) instead of by kiln itself.

Every process torchrun starts runs the same kiln command. Rank 0 goes on as usual and schedules;
every other rank turns into a worker inside `LLMEngine` (`serve_torchrun_rank`) and leaves the process
(exit 0) once rank 0 stops. The group forms from torchrun's environment (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE); each rank uses GPU LOCAL_RANK of its node. Steps travel over gloo, which reaches
other nodes (the shared-memory channel is one machine's). Nobody here watches processes on other
nodes: a rank that dies is reported by the collectives' timeout, and torchrun stops the other ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kiln.core.errors import UserInputError
from kiln.runtime.process_group import init_group
from kiln.runtime.worker_rank import Inbox, run_rank

TORCHRUN_INIT = "env://"


def torchrun_rank() -> int | None:
    """This process's global rank when torchrun started it, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"])


def torchrun_device(device: torch.device) -> torch.device:
    """The CPU, or this node's GPU LOCAL_RANK."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device.type == "cuda" else device


def check_torchrun_world(size: int) -> None:
    """Refuse a torchrun launch whose process count is not the ranks the model asks for (every rank checks)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise UserInputError(
            f"torchrun started {world} processes, but --tp-size x --pp-size is {size}: "
            f"start {size} process(es) in all (--nnodes x --nproc-per-node) or change the sizes"
        )


def serve_torchrun_rank(
    group, model_dir: Path, dtype, timeout_s: float, device: torch.device, dummy: bool, tp_size: int
) -> None:
    """Rank > 0 under torchrun: join rank 0's group, load this rank's part and run its steps until it stops."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torchrun_device(device)
    gloo_steps = init_group(rank, size, TORCHRUN_INIT, device, timeout_s)
    group.join(rank, size, tp_size, timeout_s)
    run_rank(group, rank, Inbox(None, rank - 1, gloo_steps, parent=os.getppid()), model_dir, dtype, device, dummy,
             timeout_s)  # fmt: skip
