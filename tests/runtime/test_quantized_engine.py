"""Quantized checkpoints through the whole engine: FP8 KV cache on CPU, and the GPU kernels end to end.

The oracle is our own model on the CPU in fp32 (the PyTorch reference path, checked against hand
dequantized weights in tests/models): greedy tokens from the engine must be (near-)argmax tokens of
the reference's teacher-forced logits. transformers cannot load these checkpoints (it ignores the
`modelopt` quant method), so it is no oracle here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from kiln.kernels.attention import AttentionMetadata
from kiln.models.loader import load_model
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

PROMPTS = [[1, 5, 9, 77, 3], [1, 200, 31], [1] + list(range(40, 90)), [1, 300, 301, 302, 17, 8]]
FORMATS = [("fp8", None), ("fp8", "fp8"), ("int4-awq", None), ("int4-wo", None)]


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Factory: the tiny model quantized by ModelOpt, or taken from $KILN_QUANTIZED_FIXTURES (GPU image)."""
    fixtures = os.environ.get("KILN_QUANTIZED_FIXTURES")
    if not fixtures:
        pytest.importorskip("modelopt")
    from kiln.quantize.modelopt_quantize import quantize_checkpoint

    def make(fmt: str, kv_cache_dtype: str | None) -> Path:
        name = fmt + ("-kv-fp8" if kv_cache_dtype else "")
        if fixtures:
            return Path(fixtures) / name
        out = tmp_path_factory.getbasetemp() / "quantized" / name
        if not out.exists():
            rng = random.Random(1)
            windows = [[rng.randrange(320) for _ in range(16)] for _ in range(4)]
            quantize_checkpoint(tiny_llama_dir, out, fmt, windows, kv_cache_dtype=kv_cache_dtype)
        return out

    return make


@torch.inference_mode()
def reference_logits(path: Path, token_ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len, vocab] of our fp32 CPU reference (KV rounded as an FP8 cache would)."""
    model, _ = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    metadata = AttentionMetadata.for_prefill([len(token_ids)], "cpu")
    hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), metadata)
    return model.compute_logits(hidden)


def assert_near_argmax(path: Path, outputs, margin: float) -> None:
    """Each generated token's reference logit is within `margin` x (logit range) of the best one."""
    for prompt, output in zip(PROMPTS, outputs):
        tokens = output.outputs[0].token_ids
        logits = reference_logits(path, prompt + tokens[:-1])[len(prompt) - 1 :]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        gap = (logits.max(dim=1).values - chosen) / (logits.max(dim=1).values - logits.min(dim=1).values)
        assert gap.max().item() <= margin, f"token {gap.argmax().item()} is {gap.max().item():.3f} below the best"


def test_fp8_kv_cache_on_cpu_follows_the_reference(quantized) -> None:
    path = quantized("fp8", "fp8")
    llm = LLM(str(path), device="cpu", dtype="fp32", num_kv_blocks=64)
    assert llm.engine.limits.kv_cache_dtype == "float8_e4m3fn"  # auto: the checkpoint carries KV scales
    attn = llm.engine.model.model.layers[0].self_attn.attn
    assert attn.k_cache.dtype == torch.float8_e4m3fn and attn.kv_cache_scales == attn.calibrated_kv_scales()
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert_near_argmax(path, outputs, margin=1e-4)  # same numerics as the cache-free reference


def test_kv_cache_dtype_choices(quantized) -> None:
    plain = LLM(str(quantized("fp8", None)), device="cpu", num_kv_blocks=17)
    assert plain.engine.limits.kv_cache_dtype == "float32"  # no KV scales: the model's dtype
    forced = LLM(str(quantized("fp8", None)), device="cpu", num_kv_blocks=17, kv_cache_dtype="fp8")
    assert forced.engine.limits.kv_cache_dtype == "float8_e4m3fn"
    assert forced.engine.model.model.layers[0].self_attn.attn.kv_cache_scales == (1.0, 1.0)
    widened = LLM(str(quantized("fp8", "fp8")), device="cpu", num_kv_blocks=17, kv_cache_dtype="fp32")
    assert widened.engine.model.model.layers[0].self_attn.attn.k_cache.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,kv_cache_dtype", FORMATS)
def test_gpu_kernels_follow_the_reference(quantized, fmt: str, kv_cache_dtype: str | None) -> None:
    path = quantized(fmt, kv_cache_dtype)
    llm = LLM(str(path), device="cuda", dtype="bf16", num_kv_blocks=256, max_batch_size=8)
    limits = llm.engine.limits
    assert limits.attention_backend == "triton" and limits.cuda_graph_batch_sizes
    assert limits.kv_cache_dtype == ("float8_e4m3fn" if kv_cache_dtype else "bfloat16")
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert llm.engine.runner.decode_graphs.num_replays > 0
    assert_near_argmax(path, outputs, margin=0.08)  # bf16 activations and FP8 GEMMs vs fp32


# Off-by-default fusions (docs/bench.md): the switch, and the function that runs only when the fusion does.
FUSIONS = {
    # batch-1 decode steps hand [gate | up] to the down projection's GEMV (True when it does)
    "KILN_FUSE_SILU_INTO_GEMV": ("kiln.models.llama", "silu_fused_into_next_product"),
    # one kernel rotates q and k and stores the keys (called only then)
    "KILN_FUSE_ROTARY_INTO_KV_STORE": ("kiln.kernels.triton_rotary_store", "rotary_and_store_kv"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("switch", list(FUSIONS))
@pytest.mark.parametrize("fmt,kv_cache_dtype", [("bf16", None), ("fp8", "fp8"), ("int4-awq", None)])
def test_gpu_fusions_change_no_token(
    quantized, tiny_llama_dir: Path, fmt: str, kv_cache_dtype: str | None, switch: str, monkeypatch
) -> None:
    # Each fusion computes the bits of the kernels it replaces: the same greedy tokens with its switch on as
    # off, prefill and graph-replayed decode steps alike.
    import importlib

    path = tiny_llama_dir if fmt == "bf16" else quantized(fmt, kv_cache_dtype)
    module_name, function_name = FUSIONS[switch]
    module = importlib.import_module(module_name)
    function, ran = getattr(module, function_name), []

    def recording(*args, **kwargs):
        result = function(*args, **kwargs)
        ran.append(result is not False)
        return result

    monkeypatch.setattr(module, function_name, recording)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    tokens = {}
    for on in ("0", "1"):
        monkeypatch.setenv(switch, on)
        llm = LLM(str(path), device="cuda", dtype="bf16", num_kv_blocks=256, max_batch_size=1)
        tokens[on] = [output.token_ids for output in llm.generate(PROMPTS, params)]
        assert llm.engine.runner.decode_graphs.num_replays > 0
        del llm
    assert any(ran)  # the fused path ran
    assert tokens["1"] == tokens["0"]


@pytest.mark.parametrize("fmt,kv_cache_dtype", [("fp8", "fp8"), ("int4-awq", None)])
def test_quantized_engine_generates_what_its_checkpoint_generates(quantized, tmp_path: Path, fmt, kv_cache_dtype):
    from kiln.build.stage import BuildSpec, build

    checkpoint = quantized(fmt, kv_cache_dtype)
    build(BuildSpec(source=checkpoint, output=tmp_path / "engine", target_gpu="cpu", max_seq_len=128))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = LLM(str(checkpoint), device="cpu", num_kv_blocks=64).generate(PROMPTS, params)
    engine = LLM(str(tmp_path / "engine"), device="cpu")
    assert engine.engine.limits.kv_cache_dtype == ("float8_e4m3fn" if kv_cache_dtype else "float32")
    assert [r.token_ids for r in engine.generate(PROMPTS, params)] == [r.token_ids for r in expected]
