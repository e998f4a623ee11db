"""A rank other than 0 (a tensor-parallel worker or a pipeline stage): load its part, then do what rank 0 sends.

Rank 0 sends, in order: a KVCachePlan (every rank plans at once, the warm-up forward has collectives),
a CacheSpec (allocate the cache and build the runner), a DecodeGraphSpec (capture the graphs, again
all at once), then steps until None. The rank never decides anything, so it cannot diverge. Such a
rank is either a process kiln spawned on this machine (`spawned_rank_main`) or one `torchrun` started
on any node (runtime/torchrun.py); both end in `run_rank`.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln.core.errors import KilnError
from kiln.runtime.process_group import init_group, leave_group
from kiln.runtime.step_channel import ChannelClosed, OversizeMessage, StepChannel

if TYPE_CHECKING:
    from kiln.runtime.model_runner import ModelRunner
    from kiln.runtime.tp_workers import WorkerGroup

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5


@dataclass
class CacheSpec:
    """What a worker needs to allocate its share of the KV cache (rank 0 measured and decided)."""

    num_blocks: int
    block_size: int
    kv_cache_dtype: torch.dtype
    attention_backend: str


class Inbox:
    """A rank's side of rank 0's messages: the shared-memory channel when there is one, else gloo."""

    def __init__(self, channel: StepChannel | None, reader: int, gloo_steps: dist.ProcessGroup, parent: int) -> None:
        self.channel, self.reader, self.gloo_steps, self.parent = channel, reader, gloo_steps, parent

    def receive(self) -> Any:
        """The next message (None: stop); ChannelClosed if rank 0 exited."""
        message = OversizeMessage()
        if self.channel is not None:
            message = self.channel.receive(self.reader, alive=lambda: os.getppid() == self.parent)
        if isinstance(message, OversizeMessage):  # too large for the channel, or no channel (another node)
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.gloo_steps)
            message = box[0]
        return message


def spawned_rank_main(
    group: type[WorkerGroup],
    rank: int,
    size: int,
    init: str,
    channel: tuple[str, int],
    model_dir: str,
    dtype: torch.dtype | None,
    timeout_s: float,
    device: str,
    dummy_weights: bool,
    tp_size: int,
) -> None:
    """A rank kiln spawned on this machine: join the group, then run (`run_rank`)."""
    device = torch.device(device)
    parent = os.getppid()
    if device.type == "cuda":
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    gloo_steps = init_group(rank, size, init, device, timeout_s)
    path, capacity = channel
    inbox = Inbox(StepChannel(path, size - 1, capacity, create=False), rank - 1, gloo_steps, parent)
    group.join(rank, size, tp_size, timeout_s)
    run_rank(group, rank, inbox, Path(model_dir), dtype, device, dummy_weights, timeout_s)


def run_rank(
    group: type[WorkerGroup],
    rank: int,
    inbox: Inbox,
    model_dir: Path,
    dtype: torch.dtype | None,
    device: torch.device,
    dummy_weights: bool,
    timeout_s: float,
) -> None:
    """Load this rank's part, serve rank 0's messages until None, leave the group; exit(1) on a GPU failure."""
    from kiln.models.loader import load_model

    try:
        # A checkpoint: this rank's slices cut while loading; an engine: its own rank{rank}.safetensors only.
        model, config = load_model(model_dir, dtype=dtype, device=device, dummy_weights=dummy_weights)
        _serve(group, inbox, model, config, device)
    except (RuntimeError, KilnError, ChannelClosed) as exc:  # rank 0 or another rank went away or refused
        logger.warning("%s rank %d stops: %s", group.kind, rank, exc)
        if device.type == "cuda":
            # Destroying an NCCL group waits for every rank, and rank 0 may be gone or busy elsewhere: exit now
            # and let the driver release this GPU; rank 0 sees the process end.
            logging.shutdown()
            os._exit(1)
    leave_group(True, device, timeout_s)  # rank 0 sent None and destroys at the same time


def _serve(group: type[WorkerGroup], inbox: Inbox, model, config, device: torch.device) -> None:
    """Do what rank 0 sends, in its order, until it sends None: plan the cache, build the runner, capture, step."""
    from kiln.kernels.attention_backends import select_attention_backend
    from kiln.runtime.cuda_graphs import DecodeGraphSpec, capture_decode_graphs
    from kiln.runtime.kv_sizing import KVCachePlan, plan_rank_kv_blocks

    runner = None
    while (message := inbox.receive()) is not None:
        if isinstance(message, KVCachePlan):
            plan_rank_kv_blocks(model, config, device, message)  # rank 0 receives the group's minimum
        elif isinstance(message, CacheSpec):
            backend = select_attention_backend(
                message.attention_backend, config.head_dim, next(model.parameters()).dtype, message.block_size,
                device, kv_cache_dtype=message.kv_cache_dtype,
            )  # fmt: skip
            runner = group.runner_class()(
                model, config, None, message.num_blocks, message.block_size, backend, message.kv_cache_dtype
            )
        elif isinstance(message, DecodeGraphSpec):
            runner.decode_graphs = capture_decode_graphs(model, message, device)
        else:
            runner.run_step(message)
    if runner is not None:
        release_graphs(runner)


def release_graphs(runner: ModelRunner) -> None:
    """Drop a runner's CUDA graphs and wait for the GPU: a captured NCCL kernel keeps its communicator open."""
    if runner.decode_graphs is not None:
        runner.decode_graphs = None
        gc.collect()
        torch.cuda.synchronize(runner.device)


def _exit_when_orphaned(parent: int) -> None:
    """GPU workers: rank 0 gone means no one will finish the collective this worker may be blocked in."""
    while os.getppid() == parent:
        threading.Event().wait(WATCH_INTERVAL_S)
    os._exit(1)
