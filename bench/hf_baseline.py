"""The side-by-side baseline: the same workload through transformers' `generate`, in padded static batches.

`generate` returns a batch only when its longest request is done, so a request's tokens all count at
the batch's end: the baseline reports throughput and end-to-end latency, not TTFT, TPOT or ITL.
Requests are batched in workload order, `batch_size` at a time, left-padded; each generates exactly
the batch's largest output length (EOS ignored) and is credited with its own output length.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kiln.bench.metrics import RequestTrace
from kiln.bench.workload import BenchRequest


def load_hf_model(model_dir: Path, dtype: torch.dtype, device: torch.device, dummy_weights: bool):
    """transformers' model for the directory (random weights made on the device for --dummy-weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy_weights:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


@torch.inference_mode()
def run_hf(
    model, requests: list[BenchRequest], batch_size: int, device: torch.device, progress=None
) -> list[RequestTrace]:
    """One trace per request (token times = its batch's end)."""
    traces = []
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, request in enumerate(batch):  # left padding, as decoder-only generation needs
            n = len(request.prompt_token_ids)
            ids[row, width - n :] = torch.tensor(request.prompt_token_ids)
            mask[row, width - n :] = 1
        new_tokens = max(r.output_len for r in batch)
        start = time.perf_counter()
        model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        for request in batch:
            traces.append(RequestTrace(start, (end,) * request.output_len, end, len(request.prompt_token_ids)))
        if progress is not None:
            progress(len(batch))
    return traces
