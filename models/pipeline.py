"""Pipeline-parallel state of this process: its stage, and which decoder layers each stage holds.

The runtime sets the state once, before building the model (`set_pipeline_stage`). Stage s of M holds
a contiguous run of decoder layers (split as evenly as possible, earlier stages take the extra); the
first stage also holds the token embedding, the last the final norm and the LM head (and the embedding
table when the head is tied to it). What a stage does not hold is an `OtherStage` placeholder: it has
no parameters, so the model is never materialised whole, and the loader skips the weights under it.
With one stage (the default) every module is real.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kiln.core.errors import UserInputError


def stage_layers(num_layers: int, rank: int, size: int) -> range:
    """The decoder layers stage `rank` of `size` holds: 30 layers over 4 stages -> 8, 8, 7, 7."""
    if size > num_layers:
        raise UserInputError(
            f"pp_size={size} exceeds the model's {num_layers} decoder layers (each stage needs at least one); "
            f"use --pp-size {num_layers} or fewer"
        )
    base, extra = divmod(num_layers, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class PipelineStage:
    """This process's place in the pipeline (and, with tensor parallelism inside each stage, its TP rank)."""

    rank: int = 0
    size: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    def global_rank(self, stage: int) -> int:
        """The process-group rank of this TP rank's peer in `stage` (ranks go stage by stage, TP ranks within)."""
        return stage * self.tp_size + self.tp_rank

    @property
    def receives_logits(self) -> bool:
        """Whether this process gathers the logits from the last stage: global rank 0, which samples."""
        return self.rank == 0 and self.tp_rank == 0

    @property
    def sends_logits(self) -> bool:
        """Whether this process sends its stage's logits to rank 0 (the last stage's first TP rank)."""
        return self.is_last and self.tp_rank == 0

    @property
    def is_first(self) -> bool:
        """Whether this stage embeds the tokens."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage applies the final norm and computes the logits."""
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> range:
        """The decoder layers this stage holds."""
        return stage_layers(num_layers, self.rank, self.size)


class OtherStage(nn.Module):
    """Stands in for a module another pipeline stage holds: no parameters, and nothing to run."""

    def forward(self, *args, **kwargs) -> None:
        """Refuse: this stage does not hold the module."""
        raise RuntimeError("this module is held by another pipeline stage")


_STATE = PipelineStage()


def pipeline_stage() -> PipelineStage:
    """The state models read when they are built."""
    return _STATE


def set_pipeline_stage(rank: int, size: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Set this process's stage, the number of stages and its TP place in the stage (before any model is built)."""
    global _STATE
    _STATE = PipelineStage(rank, size, tp_rank, tp_size)


def other_stage_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes ("model.layers.3.") of the modules other stages hold; their weights are not loaded here."""
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, OtherStage))
