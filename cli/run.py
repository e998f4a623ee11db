"""`kiln run MODEL -p PROMPT`: offline generation from a checkpoint, HF directory or built-in model."""

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from kiln.cli.console import stderr_console, stdout_console
from kiln.core.builtin_models import is_builtin
from kiln.core.errors import UserInputError


def builtin_cache_dir(source: str) -> Path:
    """Where a built-in model's converted checkpoint is kept ($KILN_CACHE_DIR, else ~/.cache/kiln)."""
    root = Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")
    return root / "checkpoints" / source.removeprefix("builtin:")


def _model_dir_for(model: str) -> Path:
    from kiln.core.artifact import is_artifact

    if not is_builtin(model):
        return Path(model)
    cached = builtin_cache_dir(model)
    if not is_artifact(cached):
        from kiln.convert.stage import ConvertSpec, convert

        with stderr_console.status(f"first use of {model}: converting it into {cached}"):
            convert(ConvertSpec(source=model, output=cached, force=True))
    return cached


def run_command(
    model: str = typer.Argument(..., help="Checkpoint artifact, Hugging Face model directory, or builtin:NAME."),
    prompts: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for several prompts."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    chat: bool | None = typer.Option(
        None, "--chat/--no-chat", help="Apply the chat template (default: when the model has one)."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto|bf16|fp16|fp32 (auto = the checkpoint's dtype)."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
) -> None:
    """Generate text for each prompt."""
    import torch

    from kiln.core.dtypes import torch_dtype
    from kiln.models.loader import load_model
    from kiln.runtime.generate import GenerationOptions, SingleSequenceGenerator
    from kiln.runtime.model_dir import resolve_model_dir
    from kiln.runtime.tokenizer import eos_token_ids, load_tokenizer

    model_dir = resolve_model_dir(str(_model_dir_for(model)))
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if target.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {device} asked for a GPU, but torch sees no CUDA device")
    start = time.perf_counter()
    with stderr_console.status(f"loading {model_dir}"):
        network, config = load_model(model_dir, dtype=None if dtype == "auto" else torch_dtype(dtype), device=target)
        tokenizer = load_tokenizer(model_dir)
    load_seconds = time.perf_counter() - start
    options = GenerationOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_token_ids=tuple(eos_token_ids(model_dir, tokenizer)),
    )
    use_chat = bool(tokenizer.chat_template) if chat is None else chat
    generator = SingleSequenceGenerator(network, config)
    results = []
    for prompt in prompts:
        prompt_ids = _encode(tokenizer, prompt, use_chat)
        stream = None if as_json else _TextStream(tokenizer)
        begin = time.perf_counter()
        result = generator.generate(prompt_ids, options, on_token=stream.push if stream else None)
        seconds = time.perf_counter() - begin
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if stream:
            stream.finish()
            stderr_console.print(
                f"[dim]{len(result.token_ids)} tokens in {seconds:.2f}s ({len(result.token_ids) / seconds:.1f} tok/s), "
                f"finish: {result.finish_reason}[/]",
                highlight=False,
            )
        results.append(
            {
                "prompt": prompt,
                "text": text,
                "token_ids": result.token_ids,
                "num_prompt_tokens": len(prompt_ids),
                "finish_reason": result.finish_reason,
                "seconds": round(seconds, 4),
            }
        )
    if as_json:
        typer.echo(
            json.dumps({"model": str(model_dir), "load_seconds": round(load_seconds, 3), "results": results}, indent=2)
        )


def _encode(tokenizer: Any, prompt: str, use_chat: bool) -> list[int]:
    if use_chat:
        if not tokenizer.chat_template:
            raise UserInputError("--chat needs a chat template, and this model's tokenizer has none")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


class _TextStream:
    """Prints text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        stdout_console.out(text[self.printed :], end="", highlight=False)
        self.printed = len(text)

    def finish(self) -> None:
        stdout_console.out("")
