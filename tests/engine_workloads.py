"""Workloads the engine tests share: prompts with a common prefix, transformers' greedy tokens, run loops."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams

MAX_TOKENS = 24


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 37, 12, 5, 29, 18, 1, 44]
    shared = torch.randint(1, 320, (16,), generator=generator).tolist()  # a common prefix for the cache to find
    result = []
    for i, length in enumerate(lengths):
        tail = torch.randint(1, 320, (length,), generator=generator).tolist()
        result.append(shared + tail if i % 2 else tail)
    return result


def hf_greedy(model_dir: Path, device: str) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    outputs = []
    for prompt in prompts():
        ids = torch.tensor([prompt], device=device)
        generated = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


def run_to_completion(engine: LLMEngine) -> dict[str, RequestOutput]:
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished:
        finished.update({output.request_id: output for output in engine.step() if output.finished})
    return finished


def run_staggered(engine: LLMEngine, params: SamplingParams) -> dict[str, list[int]]:
    """Half the prompts at once, the rest one per step while the first ones run."""
    pending = list(enumerate(prompts()))
    results: dict[str, list[int]] = {}
    for index, prompt in pending[:4]:
        engine.add_request(prompt, params, request_id=str(index))
    late = pending[4:]
    while engine.has_unfinished or late:
        if late:
            index, prompt = late.pop(0)
            engine.add_request(prompt, params, request_id=str(index))
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.token_ids
    return results
