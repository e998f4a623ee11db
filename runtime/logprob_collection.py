"""Logprobs read back from a step's device tensors: of sampled tokens, and of prompt tokens when asked."""

from dataclasses import dataclass

import torch

from kiln.core.host_transfer import to_device
from kiln.runtime.outputs import TopLogprobs
from kiln.runtime.request import Request
from kiln.runtime.sampler import SamplerOutput
from kiln.runtime.scheduler import ScheduledChunk


@dataclass(frozen=True)
class PromptLogprobJob:
    """Prompt positions [first, last) of one request computed this step, at these rows of the flat batch."""

    request: Request
    first: int
    last: int
    rows: list[int]


def prompt_logprob_jobs(chunks: list[ScheduledChunk]) -> list[PromptLogprobJob]:
    """The step's chunks whose prompt positions need logprobs (position p predicts prompt token p + 1)."""
    jobs, offset = [], 0
    for chunk in chunks:
        request = chunk.request
        if request.sampling_params.prompt_logprobs is None:  # nearly every chunk: asked once per step per request
            offset += chunk.num_new_tokens
            continue
        # Entries already collected (before a preemption) are kept.
        first = max(chunk.start, len(request.prompt_logprobs))
        last = min(chunk.start + chunk.num_new_tokens, request.num_prompt_tokens - 1)
        if first < last:
            rows = list(range(offset + first - chunk.start, offset + last - chunk.start))
            jobs.append(PromptLogprobJob(request, first, last, rows))
        offset += chunk.num_new_tokens
    return jobs


def prompt_logprobs(jobs: list[PromptLogprobJob], logits: list[torch.Tensor]) -> dict[str, list[TopLogprobs]]:
    """Per request, the logprob of each prompt token given the tokens before it (and the top ones if asked)."""
    found = {}
    for job, job_logits in zip(jobs, logits):
        request = job.request
        wanted = request.sampling_params.prompt_logprobs
        logprobs = torch.log_softmax(job_logits, dim=-1)  # [n, vocab]
        targets = to_device(request.token_ids[job.first + 1 : job.last + 1], torch.int64, logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        entries = [{target: value} for target, value in zip(targets.tolist(), chosen)]
        if wanted > 0:
            top_values, top_ids = logprobs.topk(wanted, dim=-1)
            for entry, ids, values in zip(entries, top_ids.tolist(), top_values.tolist()):
                entry.update(zip(ids, values))
        found[request.request_id] = entries
    return found


def sampled_logprobs(requests: list[Request], token_ids: list[int], result: SamplerOutput) -> dict[str, TopLogprobs]:
    """Per request that asked, the sampled token's logprob and the top `logprobs` others."""
    assert result.sampled_logprobs is not None
    chosen = result.sampled_logprobs.tolist()
    top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
    top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    found = {}
    for row, request in enumerate(requests):
        wanted = request.sampling_params.logprobs
        if wanted is None:
            continue
        entry = {token_ids[row]: chosen[row]}
        if top_ids is not None and top_values is not None and wanted > 0:
            entry.update(zip(top_ids[row][:wanted], top_values[row][:wanted]))
        found[request.request_id] = entry
    return found
