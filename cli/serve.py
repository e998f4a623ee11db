"""`kiln serve MODEL`: flags (over a --config YAML) -> EngineConfig + ServerSettings -> run_server."""

import os
from pathlib import Path
from typing import Any

import typer

from kiln.core.stage_options import resolve_options

SERVE_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "served_model_name": None,
    "max_queue": 512,
    "grace_period": 30.0,
    "dtype": "auto",
    "device": "auto",
    "max_batch_size": None,
    "max_num_tokens": None,
    "max_seq_len": None,
    "kv_cache_memory_fraction": 0.9,
    "kv_cache_dtype": "auto",
    "enable_prefix_caching": True,
    "attention_backend": "auto",
    "enable_cuda_graphs": True,
    "tp_size": None,  # the engine's, else 1
    "pp_size": None,  # the engine's, else 1
    "async_scheduling": None,  # on with CUDA
}


def serve_command(
    model: str = typer.Argument(..., help="Engine, checkpoint, Hugging Face directory or builtin:NAME."),
    host: str | None = typer.Option(None, "--host", help="Address to bind [default: 127.0.0.1]."),
    port: int | None = typer.Option(None, "--port", help="[default: 8000]"),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' [env KILN_API_KEY]."
    ),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="[default: the model's name]"),
    max_queue: int | None = typer.Option(None, "--max-queue", help="Requests held before 503 [default: 512]."),
    grace_period: float | None = typer.Option(None, "--grace-period", help="Seconds to finish requests on SIGTERM."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto|bf16|fp16|fp32."),
    device: str | None = typer.Option(None, "--device", help="auto|cpu|cuda|cuda:N."),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size"),
    max_num_tokens: int | None = typer.Option(None, "--max-num-tokens"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len"),
    kv_cache_memory_fraction: float | None = typer.Option(None, "--kv-cache-memory-fraction"),
    kv_cache_dtype: str | None = typer.Option(None, "--kv-cache-dtype", help="auto|fp8|bf16|fp16|fp32."),
    enable_prefix_caching: bool | None = typer.Option(None, "--prefix-caching/--no-prefix-caching"),
    attention_backend: str | None = typer.Option(None, "--attention-backend", help="auto|torch|triton."),
    enable_cuda_graphs: bool | None = typer.Option(None, "--cuda-graphs/--no-cuda-graphs"),
    tp_size: int | None = typer.Option(None, "--tp-size", help="Tensor-parallel ranks, one process per GPU."),
    pp_size: int | None = typer.Option(None, "--pp-size", help="Pipeline stages [default: the engine's, else 1]."),
    async_scheduling: bool | None = typer.Option(
        None,
        "--async-scheduling/--no-async-scheduling",
        help="Overlap step N+1's host work with step N [default: on with CUDA].",
    ),
    dummy_weights: bool = typer.Option(False, "--dummy-weights", help="Random weights (MODEL: a config.json)."),
    preset: str | None = typer.Option(None, "--preset", help="Architecture for --dummy-weights, e.g. llama-3-8b."),
    dummy_quantization: str | None = typer.Option(None, "--dummy-quantization", help="fp8 or int4-awq dummy weights."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of these options; flags override it."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)."""
    from kiln.runtime.engine_config import EngineConfig
    from kiln.runtime.model_dir import resolve_model_source
    from kiln.serve.app import ServerSettings
    from kiln.serve.server import run_server

    flags = {key: value for key, value in locals().items() if key in SERVE_DEFAULTS}
    options = resolve_options(SERVE_DEFAULTS, flags, config)
    if dummy_weights:
        from kiln.runtime.model_dir import resolve_dummy_model

        model_dir = resolve_dummy_model(preset or model, dummy_quantization)
    else:
        model_dir = resolve_model_source(model)  # a bad model argument fails before the port opens
    server_keys = ("host", "port", "served_model_name", "max_queue", "grace_period")
    engine_config = EngineConfig(
        **{k: v for k, v in options.items() if k not in server_keys}, dummy_weights=dummy_weights
    )
    settings = ServerSettings(
        served_model_name=options["served_model_name"] or (model if model.startswith("builtin:") else model_dir.name),
        api_key=api_key or os.environ.get("KILN_API_KEY") or None,
        max_queue=options["max_queue"],
    )
    run_server(model_dir, engine_config, settings, options["host"], options["port"], options["grace_period"])
