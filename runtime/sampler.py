"""Batched token sampling on the logits' device: penalties, greedy, temperature, top-k/top-p/min-p, logprobs.

Nothing here reads a device value back to the host: per-request decisions that need the host (is any row
greedy? does any row use a penalty?) are taken in `SamplingBatch.build` from the Python-side params.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kiln.core.host_transfer import to_device
from kiln.kernels.random_draw import exponential_race, logit_race, row_keys
from kiln.runtime.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams


def _pad(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Right-pad token id lists with -1 to one length (-1 is counted nowhere, see `_token_counts`)."""
    width = max((len(r) for r in rows), default=0)
    return [list(r) + [-1] * (width - len(r)) for r in rows]


@dataclass
class SamplingBatch:
    """Per-row sampling settings for one step (rows = requests that sample a token this step)."""

    temperature: Tensor  # [B] fp32; below GREEDY_TEMPERATURE_EPS = greedy
    top_p: Tensor  # [B] fp32, 1 = off
    top_k: Tensor  # [B] int64, 0 = off
    min_p: Tensor  # [B] fp32, 0 = off
    repetition_penalty: Tensor  # [B] fp32, 1 = off
    presence_penalty: Tensor  # [B] fp32, 0 = off
    frequency_penalty: Tensor  # [B] fp32, 0 = off
    # [B] int64: each row's noise key, a hash of its request's seed and output position (see
    # kernels/random_draw), so a request's draws depend only on its own seed, not on its batch.
    noise_keys: Tensor
    # Token ids on the device for the penalties, -1 padded; None when no row of the batch needs them.
    prompt_token_ids: Tensor | None  # [B, max_prompt_len] int64 (repetition penalty only)
    output_token_ids: Tensor | None  # [B, max_output_len] int64
    max_num_logprobs: int | None  # largest `logprobs` in the batch, None = none asked
    # Host-side facts that let the sampler skip whole stages; the defaults (do everything) are always correct.
    all_greedy: bool = False
    all_random: bool = False
    use_top_k: bool = True
    use_top_p: bool = True
    use_min_p: bool = True

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        prompt_token_ids: list[Sequence[int]],
        output_token_ids: list[Sequence[int]],
        device: torch.device | str,
        output_positions: Sequence[int] | None = None,
    ) -> "SamplingBatch":
        """Gather the rows' params into device tensors (two queued copies, no host sync).

        seeds: each row's request seed; the row's output position is output_positions[row], by default
        len(output_token_ids[row]) (a step in flight may hold tokens the host does not know yet).
        """
        device = torch.device(device)
        random = [p for p in params if not p.is_greedy]
        columns = to_device(
            [
                [0.0 if p.is_greedy else p.temperature for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            ],
            torch.float32,
            device,
            align_rows=True,
        )  # [6, B]
        positions = output_positions if output_positions is not None else [len(ids) for ids in output_token_ids]
        keys = row_keys(seeds, positions)
        integers = to_device(  # [2, B]
            np.stack([[max(p.top_k, 0) for p in params], keys]), torch.int64, device, align_rows=True
        )
        use_repetition = any(p.repetition_penalty != 1.0 for p in params)
        use_penalties = use_repetition or any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=columns[0],
            top_p=columns[1],
            top_k=integers[0],
            min_p=columns[2],
            repetition_penalty=columns[3],
            presence_penalty=columns[4],
            frequency_penalty=columns[5],
            noise_keys=integers[1],
            prompt_token_ids=to_device(_pad(prompt_token_ids), torch.int64, device) if use_repetition else None,
            output_token_ids=to_device(_pad(output_token_ids), torch.int64, device) if use_penalties else None,
            max_num_logprobs=max(logprobs) if logprobs else None,
            all_greedy=not random,
            all_random=len(random) == len(params),
            use_top_k=any(p.top_k > 0 for p in random),
            use_top_p=any(p.top_p < 1.0 for p in random),
            use_min_p=any(p.min_p > 0.0 for p in random),
        )


@dataclass
class SamplerOutput:
    """One step's sampled tokens and, when asked, their logprobs."""

    sampled_token_ids: Tensor  # [B] int64
    sampled_logprobs: Tensor | None  # [B] fp32, log-softmax of the raw logits at the sampled token
    top_logprob_ids: Tensor | None  # [B, max_num_logprobs] int64, best first
    top_logprobs: Tensor | None  # [B, max_num_logprobs] fp32, descending


def _token_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """How often each vocabulary token occurs in each row: [B, L] ids (-1 padded) -> [B, vocab] fp32."""
    # Padding goes to an extra column that is dropped, so no Python loop and no mask over the ids.
    index = token_ids.masked_fill(token_ids < 0, vocab_size)
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: Tensor,
    prompt_token_ids: Tensor | None,
    output_token_ids: Tensor,
    repetition_penalty: Tensor,
    presence_penalty: Tensor,
    frequency_penalty: Tensor,
) -> Tensor:
    """Repetition penalty on tokens seen in prompt or output, presence/frequency on output counts (vLLM's)."""
    vocab_size = logits.shape[1]
    output_counts = _token_counts(output_token_ids, vocab_size)  # [B, vocab]
    if prompt_token_ids is not None:
        seen = (output_counts > 0) | (_token_counts(prompt_token_ids, vocab_size) > 0)  # [B, vocab]
        penalty = torch.where(seen, repetition_penalty[:, None], 1.0)
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - frequency_penalty[:, None] * output_counts
    return logits - presence_penalty[:, None] * (output_counts > 0)


def apply_top_k_top_p_min_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None, min_p: Tensor | None) -> Tensor:
    """Set to -inf the logits that top-k, then top-p, then min-p filter out; None (or 0/1/0) = filter off.

    `logits` [B, vocab] are temperature-scaled; `top_k` [B] int64, `top_p` and `min_p` [B] fp32. Top-p keeps
    the smallest set of best tokens whose probability (after top-k) reaches p; min-p keeps tokens whose
    probability is at least min_p times the best one's. The best token is always kept.
    """
    if top_k is not None or top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, vocab] each
        rank = torch.arange(logits.shape[1], device=logits.device)  # [vocab]
        removed = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if top_k is not None:
            k = torch.where(top_k > 0, top_k, logits.shape[1])  # [B]
            removed |= rank[None, :] >= k[:, None]
            sorted_logits = sorted_logits.masked_fill(removed, float("-inf"))
        if top_p is not None:
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # [B, vocab]: probability of the better tokens
            # Rows with top_p = 1 are left untouched (no rounding error in the cumulative sum cuts a tail).
            removed |= (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
            removed[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(removed).scatter_(1, order, removed), float("-inf"))
    if min_p is not None:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); log(0) = -inf keeps every token.
        threshold = logits.amax(dim=-1) + torch.log(min_p)  # [B]
        logits = logits.masked_fill(logits < threshold[:, None], float("-inf"))
    return logits


def suppress_tokens(logits: Tensor, rows: Sequence[int], token_ids: Sequence[Sequence[int]]) -> Tensor:
    """Set logits[rows[i], t] to -inf in place for each t in token_ids[i] (e.g. EOS below min_tokens)."""
    pairs = [(row, token_id) for row, ids in zip(rows, token_ids, strict=True) for token_id in ids]
    if pairs:
        index = to_device(pairs, torch.int64, logits.device)  # [num_pairs, 2]: one copy, one index_put
        # The value is made on the device: a Python float would be copied from the host, which waits.
        minus_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
        logits.index_put_((index[:, 0], index[:, 1]), minus_inf)
    return logits


class Sampler:
    """Turns one step's logits into tokens (and logprobs), each row with its own settings and seed."""

    def __init__(self) -> None:
        # The draw races the logits in log space (kernels/random_draw.py), with the temperature inside its
        # kernel and no softmax: one pass over [B, vocab] fp32 logits instead of three (division, softmax,
        # draw). Same noise, same distribution. On an H200, fp8 128/128 with 8,192 requests at 1,024
        # sequences: 26,494 and 26,482 output tok/s against 25,991 and 25,982 with the three passes, in
        # both orders (docs/benchmarks.md, round 10). KILN_SAMPLE_FROM_LOGITS=0 runs the three passes.
        self.from_logits = os.environ.get("KILN_SAMPLE_FROM_LOGITS", "1") != "0"

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample from [B, vocab] logits: logprobs of the raw logits, then penalties, then greedy or draw."""
        logits = logits.float()
        logprobs = logits.log_softmax(dim=-1) if batch.max_num_logprobs is not None else None  # [B, vocab]
        if batch.output_token_ids is not None:
            logits = apply_penalties(
                logits,
                batch.prompt_token_ids,
                batch.output_token_ids,
                batch.repetition_penalty,
                batch.presence_penalty,
                batch.frequency_penalty,
            )
        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample_random(logits, batch)
        if logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        sampled_logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
        top_logprobs, top_ids = logprobs.topk(batch.max_num_logprobs, dim=-1)  # sorted, best first
        return SamplerOutput(token_ids, sampled_logprobs, top_ids, top_logprobs)

    def _sample_random(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        """Temperature, filters and a draw for every row; greedy rows then take their argmax instead."""
        greedy = batch.temperature < GREEDY_TEMPERATURE_EPS  # [B]
        temperature = batch.temperature.masked_fill(greedy, 1.0)
        filtered = batch.use_top_k or batch.use_top_p or batch.use_min_p
        if self.from_logits and not filtered:  # the temperature is applied inside the draw's one pass
            sampled = logit_race(logits, temperature.reciprocal(), batch.noise_keys)
        else:
            scaled = apply_top_k_top_p_min_p(
                logits / temperature[:, None],
                batch.top_k if batch.use_top_k else None,
                batch.top_p if batch.use_top_p else None,
                batch.min_p if batch.use_min_p else None,
            )
            if self.from_logits:
                sampled = logit_race(scaled, torch.ones_like(temperature), batch.noise_keys)
            else:
                sampled = exponential_race(scaled.softmax(dim=-1), batch.noise_keys)
        if batch.all_random:
            return sampled
        return torch.where(greedy, logits.argmax(dim=-1), sampled)
