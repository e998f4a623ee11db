"""`kiln run MODEL -p PROMPT`: offline generation through the batched engine."""

import json
import time
from pathlib import Path
from typing import Any

import typer

from kiln.cli.console import stderr_console, stdout_console
from kiln.cli.prompts_file import PromptItem, read_prompts_file
from kiln.core.errors import UserInputError


def run_command(
    model: str = typer.Argument(..., help="Checkpoint artifact, Hugging Face model directory, or builtin:NAME."),
    prompts: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeat for several prompts."),
    prompts_file: Path | None = typer.Option(
        None, "--prompts-file", help="txt (one prompt per line) or JSONL with 'prompt' or 'messages' per line."
    ),
    chat: bool | None = typer.Option(
        None, "--chat/--no-chat", help="Apply the chat template to text prompts (default: when the model has one)."
    ),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most tokens to generate per prompt."),
    min_tokens: int = typer.Option(0, "--min-tokens", help="Fewest tokens before EOS or stop tokens may end it."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty"),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (not emitted); repeatable."),
    seed: int | None = typer.Option(None, "--seed", help="Per-request seed for reproducible sampling."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate max_tokens whatever the model says."),
    dtype: str = typer.Option("auto", "--dtype", help="auto|bf16|fp16|fp32 (auto = the checkpoint's dtype)."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N."),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size"),
    max_num_tokens: int | None = typer.Option(None, "--max-num-tokens", help="Token budget per step."),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len"),
    kv_cache_memory_fraction: float = typer.Option(0.9, "--kv-cache-memory-fraction"),
    kv_cache_dtype: str = typer.Option(
        "auto", "--kv-cache-dtype", help="auto|fp8|bf16|fp16|fp32 (auto = fp8 when the checkpoint has KV scales)."
    ),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching"),
    attention_backend: str = typer.Option("auto", "--attention-backend", help="auto|torch|triton."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="Replay decode steps from graphs."),
    tp_size: int | None = typer.Option(
        None, "--tp-size", help="Tensor-parallel ranks, one process per GPU [default: the engine's, else 1]."
    ),
    pp_size: int | None = typer.Option(
        None,
        "--pp-size",
        help="Pipeline stages, layers split across processes, --tp-size ranks in each [default: the engine's, else 1].",
    ),
    async_scheduling: bool | None = typer.Option(
        None,
        "--async-scheduling/--no-async-scheduling",
        help="Overlap step N+1's host work with step N [default: on with CUDA].",
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write one JSON line per prompt here."),
    as_json: bool = typer.Option(False, "--json", help="Print all results as one JSON document on stdout."),
) -> None:
    """Generate text for each prompt; one prompt streams, many show progress and a summary."""
    from kiln.runtime.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams

    items = [PromptItem(text=p) for p in prompts] + (read_prompts_file(prompts_file) if prompts_file else [])
    if not items:
        raise UserInputError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        stop=stop or None,
        seed=seed,
        ignore_eos=ignore_eos,
    )
    start = time.perf_counter()
    with stderr_console.status(f"loading {model}"):
        llm = LLM(
            model,
            dtype=dtype,
            device=device,
            max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            max_seq_len=max_seq_len,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            kv_cache_dtype=kv_cache_dtype,
            enable_prefix_caching=prefix_caching,
            attention_backend=attention_backend,
            enable_cuda_graphs=cuda_graphs,
            tp_size=tp_size,
            pp_size=pp_size,
            async_scheduling=async_scheduling,
        )
    load_seconds = time.perf_counter() - start
    token_prompts = [_encode(llm, item, chat) for item in items]
    begin = time.perf_counter()
    if len(items) == 1 and not as_json:
        results = [_stream_one(llm, token_prompts[0], params)]
    else:
        results = _generate_many(llm, token_prompts, params, show_progress=not as_json)
    seconds = time.perf_counter() - begin
    records = [_record(item, result) for item, result in zip(items, results)]
    if output is not None:
        output.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    summary = _summary(records, seconds, load_seconds, llm)
    if as_json:
        report = {"model": model, "model_dir": str(llm.engine.model_dir), "summary": summary, "results": records}
        typer.echo(json.dumps(report, indent=2))
        return
    if len(items) > 1 and output is None:
        for record in records:
            stdout_console.print(f"[bold]>>> {record['prompt']}[/]", highlight=False)
            stdout_console.out(record["text"], highlight=False)
    _print_summary(summary)


def _encode(llm: Any, item: PromptItem, chat: bool | None) -> list[int]:
    if item.messages is not None:
        return llm.apply_chat_template(item.messages)
    has_template = llm.tokenizer is not None and bool(llm.tokenizer.chat_template)
    if chat or (chat is None and has_template):
        return llm.apply_chat_template([{"role": "user", "content": item.text}])
    if llm.tokenizer is None:
        raise UserInputError("this model has no tokenizer, so it cannot take text prompts")
    return llm.tokenizer(item.text).input_ids


def _stream_one(llm: Any, prompt_ids: list[int], params: Any) -> Any:
    last = None
    for delta in llm.generate_stream(prompt_ids, params):
        stdout_console.out(delta.text, end="", highlight=False)
        last = delta.output
    stdout_console.out("")
    return last


def _generate_many(llm: Any, token_prompts: list[list[int]], params: Any, show_progress: bool) -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr_console, disable=not show_progress) as progress:
        task = progress.add_task("generate", total=len(token_prompts))
        return llm.generate(token_prompts, params, on_output=lambda _: progress.advance(task))


def _record(item: PromptItem, result: Any) -> dict[str, Any]:
    metrics = result.metrics
    return {
        "prompt": item.text if item.messages is None else item.messages,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "num_prompt_tokens": metrics.num_prompt_tokens,
        "num_cached_prompt_tokens": metrics.num_cached_prompt_tokens,
        "ttft_s": round(metrics.time_to_first_token or 0.0, 4),
        "latency_s": round(metrics.latency or 0.0, 4),
    }


def _summary(records: list[dict[str, Any]], seconds: float, load_seconds: float, llm: Any) -> dict[str, Any]:
    num_output = sum(len(record["token_ids"]) for record in records)
    limits = llm.engine.limits
    return {
        "requests": len(records),
        "prompt_tokens": sum(record["num_prompt_tokens"] for record in records),
        "output_tokens": num_output,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(num_output / seconds, 2) if seconds > 0 else None,
        "load_seconds": round(load_seconds, 3),
        "preemptions": llm.engine.scheduler.stats.num_preemptions,
        "device": limits.device,
        "dtype": limits.dtype,
        "kv_cache_dtype": limits.kv_cache_dtype,
        "attention_backend": limits.attention_backend,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    text = (
        f"{summary['requests']} request(s), {summary['prompt_tokens']} prompt + {summary['output_tokens']} output "
        f"tokens in {summary['seconds']:.2f}s ({summary['output_tokens_per_s']} tok/s) on {summary['device']}, "
        f"{summary['dtype']}, {summary['attention_backend']} attention"
    )
    stderr_console.print(f"[dim]{text}[/]", highlight=False)
