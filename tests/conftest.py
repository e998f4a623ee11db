"""Shared fixtures: a tiny random model directory and the built-in model converted once."""

import os
import random
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

# Tests never reach a hub; a library that tries should fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (GQA, untied embeddings) in fp32 with a tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def builtin_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in SmolLM2-135M-Instruct converted once for the whole session."""
    from kiln.convert.stage import ConvertSpec, convert

    out = tmp_path_factory.mktemp("builtin") / "smollm2-135m"
    convert(ConvertSpec(source="builtin:smollm2-135m", output=out))
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip, with the reason, on machines without CUDA (CI is CPU-only)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return  # the interpreter runs Triton kernels on CPU tensors (KILN_TEST_DEVICE=cpu)
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama converted to a bf16 checkpoint artifact once."""
    from kiln.convert.stage import ConvertSpec, convert

    out = tmp_path_factory.mktemp("cli") / "tiny"
    convert(ConvertSpec(source=str(tiny_llama_dir), output=out, dtype="bf16"))
    return out


@pytest.fixture(scope="session")
def serve_checkpoint(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as an fp32 checkpoint (the server tests compare texts with the CPU's fp32 runs)."""
    from kiln.convert.stage import ConvertSpec, convert

    out = tmp_path_factory.mktemp("serve") / "tiny"
    convert(ConvertSpec(source=str(tiny_llama_dir), output=out, dtype="fp32"))
    return out


@pytest.fixture(scope="session")
def modelopt_checkpoint(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Factory: the tiny Llama quantized by ModelOpt (format, int4 group size, KV cache dtype), once per session."""
    pytest.importorskip("modelopt")  # a declared dependency (installed by `make test`); the GPU image lacks it
    from kiln.quantize.modelopt_quantize import quantize_checkpoint

    cache: dict[tuple, Path] = {}
    rng = random.Random(1)
    windows = [[rng.randrange(320) for _ in range(16)] for _ in range(4)]

    def make(fmt: str, group_size: int = 128, kv_cache_dtype: str | None = None) -> Path:
        key = (fmt, group_size, kv_cache_dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("modelopt") / f"{fmt}-g{group_size}-kv-{kv_cache_dtype}"
            quantize_checkpoint(tiny_llama_dir, out, fmt, windows, group_size=group_size, kv_cache_dtype=kv_cache_dtype)
            cache[key] = out
        return cache[key]

    return make
