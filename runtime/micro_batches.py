"""A step's micro-batches for pipeline parallelism: contiguous groups of whole sequences.

Every stage splits the step it received the same way (a pure function of `StepInputs`), so stages
agree on the shapes they send and receive without sending them. Attention is per sequence, so running
whole sequences in separate forwards computes every token exactly as one forward would. The logits the
step asks for (`logit_rows`, groups of flat token rows) are computed per micro-batch for the rows it
holds; `gather_logit_groups` puts them back into the step's groups.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kiln.runtime.model_runner import StepInputs, select_rows


@dataclass(frozen=True)
class MicroBatch:
    """One group of the step's sequences, with its slice of the step's inputs."""

    inputs: StepInputs  # logit_rows: one group of this micro-batch's rows (relative to it), or none
    token_offset: int  # flat index in the step of this micro-batch's first token
    num_logit_rows: int  # rows of logits this micro-batch contributes

    @property
    def num_tokens(self) -> int:
        """New tokens in this micro-batch."""
        return len(self.inputs.input_ids)


def split_sequences(query_lens: list[int], max_parts: int) -> list[range]:
    """At most `max_parts` contiguous runs of sequences, none empty, each near an equal share of the tokens."""
    num_parts = min(max_parts, len(query_lens))
    total = sum(query_lens)
    cumulative = list(itertools.accumulate(query_lens))  # tokens of sequences 0..i
    runs, start = [], 0
    for part in range(1, num_parts):
        target = total * part / num_parts
        # End this run where the token count is closest to its share, leaving a sequence for each later run.
        last_end = len(query_lens) - (num_parts - part)
        end = min(range(start + 1, last_end + 1), key=lambda e: abs(cumulative[e - 1] - target))
        runs.append(range(start, end))
        start = end
    runs.append(range(start, len(query_lens)))
    return runs


def split_micro_batches(step: StepInputs, max_micro_batches: int) -> list[MicroBatch]:
    """The step as up to `max_micro_batches` micro-batches of whole sequences (the same on every stage)."""
    wanted = sorted({row for rows in step.logit_rows for row in rows})  # each row's logits computed once
    micro_batches = []
    for run in split_sequences(step.query_lens, max_micro_batches):
        first = sum(step.query_lens[: run.start])
        end = first + sum(step.query_lens[run.start : run.stop])
        rows = [row - first for row in wanted if first <= row < end]
        inputs = StepInputs(
            input_ids=step.input_ids[first:end],
            positions=step.positions[first:end],
            slot_mapping=step.slot_mapping[first:end],
            query_lens=step.query_lens[run.start : run.stop],
            seq_lens=step.seq_lens[run.start : run.stop],
            block_tables=step.block_tables[run.start : run.stop],
            logit_rows=[rows] if rows else [],
        )
        micro_batches.append(MicroBatch(inputs, first, len(rows)))
    return micro_batches


def gather_logit_groups(step: StepInputs, logits: torch.Tensor) -> list[torch.Tensor]:
    """The step's row groups from `logits` [num_wanted_rows, vocab]: all its rows, sorted, each once."""
    wanted = sorted({row for rows in step.logit_rows for row in rows})
    index = {row: i for i, row in enumerate(wanted)}
    return [select_rows(logits, [index[row] for row in rows]) for rows in step.logit_rows]
