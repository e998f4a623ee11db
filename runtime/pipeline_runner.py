"""One pipeline stage's step: micro-batches through this stage's layers, activations sent point to point.

Every stage runs `run_step` on the step rank 0 broadcast and splits it into the same micro-batches.
Stage s receives micro-batch k's (hidden, residual) from stage s-1, runs its layers and sends the
result on to stage s+1 without waiting for it to arrive (isend), so it can start on micro-batch k+1
while stage s+1 works on k: with M stages, up to M micro-batches are in flight. The last stage applies
the final norm, computes the logits of the rows the step asks for and sends them to rank 0 (stage 0),
which samples as it does without pipeline parallelism. Every message has a fixed shape both sides
derive from the step, and a tag (the micro-batch's index; NCCL ignores tags but keeps each pair of
ranks' messages in order), so no sizes travel and nothing is mismatched. On GPUs the messages go
device to device over NCCL and the waits order streams, not the host. Every wait is bounded by the
process group's timeout: a stage that died or hangs ends the step with an error. On GPUs each stage
replays its captured CUDA graph for pure decode micro-batches (runtime/cuda_graphs.py); the sends and
receives stay outside the graphs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from kiln.models.pipeline import pipeline_stage
from kiln.runtime.micro_batches import MicroBatch, gather_logit_groups, split_micro_batches
from kiln.runtime.model_runner import ModelRunner, StepInputs, eager_inputs, select_rows
from kiln.runtime.pipeline_workers import PipelineParallelError


class PipelineRunner(ModelRunner):
    """A ModelRunner whose forward is this stage's part of a pipeline (its layers, its KV cache)."""

    @torch.inference_mode()
    def run_step(self, step: StepInputs) -> list[torch.Tensor]:
        """Run this stage over the step's micro-batches; rank 0 returns the logits groups, other stages []."""
        stage = pipeline_stage()
        micro_batches = split_micro_batches(step, stage.size)
        sends, logits = [], []
        for k, micro_batch in enumerate(micro_batches):
            sends.append(self._run_micro_batch(k, micro_batch))
            if stage.receives_logits and micro_batch.num_logit_rows:
                # Posted after micro-batch k went out: NCCL runs one pair of ranks' sends and receives in
                # the order they were posted, so with two stages a receive posted first would block the send.
                logits.append(self._receive_logits(k, micro_batch))
        with _peers_answering():
            for _, work in sends + logits:  # `sends` keeps each tensor referenced until its send completed
                if work is not None:
                    work.wait()
        if not stage.receives_logits:
            return []
        received = [tensor for tensor, _ in logits]
        return gather_logit_groups(step, torch.cat(received)) if received else []

    def _receive_logits(self, k: int, micro_batch: MicroBatch) -> tuple[torch.Tensor, dist.Work]:
        """Rank 0: a receive for the last stage's fp32 logits [rows, vocab] of micro-batch k."""
        stage = pipeline_stage()
        last = stage.global_rank(stage.size - 1)  # the last stage's first TP rank
        rows, vocab = micro_batch.num_logit_rows, self.config.vocab_size
        buffer = torch.empty(rows, vocab, dtype=torch.float32, device=self.device)
        with _peers_answering():
            return buffer, dist.irecv(buffer, src=last, tag=k)

    def _run_micro_batch(self, k: int, micro_batch: MicroBatch) -> tuple[torch.Tensor | None, dist.Work | None]:
        """Receive (unless first), run this stage's layers, start the send onward; returns what is being sent."""
        stage = pipeline_stage()
        inputs = micro_batch.inputs
        received = None if stage.is_first else self._receive_activations(k, micro_batch)
        output = self._stage_forward(inputs, received)
        if stage.is_last and not micro_batch.num_logit_rows:
            return None, None
        if stage.is_last:
            # fp32 [rows, vocab]; every TP rank of the stage computes them (the vocabulary gather is collective)
            outgoing, destination = self.model.compute_logits(select_rows(output, inputs.logit_rows[0])), 0
            if not stage.sends_logits:
                return None, None
        else:
            outgoing, destination = output, stage.global_rank(stage.rank + 1)
        outgoing = outgoing.contiguous()  # the very tensor sent is returned: it must live until the send completes
        with _peers_answering():
            return outgoing, dist.isend(outgoing, dst=destination, tag=k)

    def _receive_activations(self, k: int, micro_batch: MicroBatch) -> torch.Tensor:
        """[2, num_tokens, hidden]: the previous stage's hidden states and residual stream, stacked."""
        stage = pipeline_stage()
        received = torch.empty(2, micro_batch.num_tokens, self.config.hidden_size, dtype=self.dtype, device=self.device)
        with _peers_answering():
            dist.irecv(received, src=stage.global_rank(stage.rank - 1), tag=k).wait()
        return received

    def _stage_forward(self, inputs: StepInputs, received: torch.Tensor | None) -> torch.Tensor:
        """This stage's layers over a micro-batch: the last stage's final hidden states [num_tokens, hidden],
        an earlier stage's [2, num_tokens, hidden] to send on (a tensor of its own, never a graph's buffer).

        Pure decode micro-batches replay this stage's captured graph; the rest run eagerly.
        """
        is_last = pipeline_stage().is_last
        graphs = self.decode_graphs
        num_tokens = len(inputs.input_ids)
        if graphs is not None and num_tokens == len(inputs.query_lens) and graphs.can_run(num_tokens):
            output = graphs.run(
                inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens, inputs.block_tables,
                stage_inputs=received,
            )  # fmt: skip
            # The next replay of this bucket (maybe the next micro-batch's) overwrites the graph's output while
            # the send may still be reading it: send a copy. The last stage's logits are computed before that.
            return output if is_last else output.clone()
        input_ids, positions, metadata = eager_inputs(inputs, self.device)
        hidden, residual = (None, None) if received is None else (received[0], received[1])
        hidden, residual = self.model.forward_stage(input_ids, positions, metadata, hidden, residual)
        return hidden if is_last else torch.stack([hidden, residual])


@contextmanager
def _peers_answering() -> Iterator[None]:
    """Turn gloo's errors (a peer closed its connection, or the timeout passed) into PipelineParallelError."""
    try:
        yield
    except RuntimeError as exc:
        raise PipelineParallelError(f"a pipeline stage stopped answering: {exc}") from exc
