"""Joining and leaving the torch.distributed group every rank of a model shares (tensor or pipeline parallel).

On GPUs the model's collectives use NCCL, on the CPU gloo; either way a second group, gloo, carries
the messages rank 0 sends that are not tensors on the device. Leaving is the delicate part: NCCL's
destroy waits for every rank to destroy too, so a rank that is gone would make it wait forever; with a
peer gone the group is aborted first, and every leave is bounded in time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from kiln.core.errors import UserInputError

logger = logging.getLogger(__name__)

# The gloo group for messages that do not go through the step channel: waiting on it for the next one must
# not time out (a server idles between requests as long as it likes); a rank 0 that dies closes its sockets.
IDLE_TIMEOUT = timedelta(days=365)
_LEAVE_TIMEOUT_S = 15.0  # closing the group takes well under a second when every rank closes it


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each rank: the CPU for all, or one GPU each from `device`'s index on."""
    if device.type != "cuda":
        return [device] * size
    first = device.index or 0
    available = torch.cuda.device_count()
    if first + size > available:
        raise UserInputError(
            f"{size} ranks need GPUs {first}..{first + size - 1}, but torch sees {available}: "
            "lower --tp-size/--pp-size or pick an earlier --device cuda:N"
        )
    return [torch.device("cuda", first + rank) for rank in range(size)]


def init_group(rank: int, size: int, init: str, device: torch.device, timeout_s: float) -> dist.ProcessGroup:
    """Join the model's group (NCCL on GPUs, gloo on the CPU); returns the gloo group for messages."""
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init, rank=rank, world_size=size, timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size, timeout=timeout)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def leave_group(healthy: bool, device: torch.device, timeout_s: float) -> None:
    """Destroy the process group; on GPUs with a rank gone, abort it first (a destroy would wait for that rank).

    Either runs in a thread bounded by the timeout: a leave that cannot finish is logged, never a hang.
    """
    if not dist.is_initialized():
        return
    bound = min(timeout_s, _LEAVE_TIMEOUT_S)
    if device.type == "cuda" and not healthy:
        _bounded(abort_collectives, bound)
    if not _bounded(dist.destroy_process_group, bound):
        logger.warning("the process group did not close within %.0f s; leaving it", bound)


def abort_collectives() -> None:
    """Abort every NCCL communicator of this process: kernels waiting on a dead peer return."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception as exc:  # an abort that cannot run leaves the timeout to act
        logger.warning("could not abort the NCCL group: %s", exc)


def _bounded(action: Callable[[], None], timeout_s: float) -> bool:
    """Run `action` in a daemon thread; whether it finished within the timeout."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()
