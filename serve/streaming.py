"""Server-Sent Events for streamed completions: deltas per choice, a usage chunk, then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.serve.async_engine import RequestStream
from kiln.serve.responses import chat_logprobs, completion_logprobs, sse, usage, usage_of

ChunkMaker = Callable[[int, CompletionOutput, int, int], dict[str, Any] | None]


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests as they arrive; cancelling this cancels them all."""
    if len(streams) == 1:  # the usual request: read it directly, without a pump task and a second queue per output
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()  # aborts the request unless it finished
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        # Cancelling a pump cancels its request's generator, whose own cleanup aborts the request;
        # the generators are closed only once their pumps are done (closing a running one fails).
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def stream_completion(
    streams: list[RequestStream], base: dict[str, Any], num_choices: int, tokenizer: Any,
    include_usage: bool, chat: bool, top_n: int, on_finished: Callable[[RequestOutput], None],
    token_ids: bool = False,
) -> AsyncIterator[str]:  # fmt: skip
    """SSE lines of a streamed completions or chat-completions response.

    A choice gets a chunk when it has new text or has finished; with `token_ids` (the request's
    return_token_ids) also when it has new tokens only, and its chunks carry them.
    """
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    finished: list[RequestOutput] = []
    if chat:  # the first chunk of each choice announces the assistant role
        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(num_choices)]  # fmt: skip
        yield sse({**base, "choices": first})
    async for prompt_index, output in merged(streams):
        choices = []
        for completion in output.outputs:
            index = prompt_index * len(output.outputs) + completion.index
            text_start, token_start = sent_text.get(index, 0), sent_tokens.get(index, 0)
            new_text = completion.text[text_start:]
            new_tokens = completion.token_ids[token_start:] if token_ids else []
            if not new_text and not new_tokens and completion.finish_reason is None:
                continue
            sent_text[index], sent_tokens[index] = len(completion.text), len(completion.token_ids)
            if chat:
                choice = {"index": index, "delta": {"content": new_text},
                          "logprobs": chat_logprobs(tokenizer, completion, token_start, top_n),
                          "finish_reason": completion.finish_reason}  # fmt: skip
            else:
                choice = {"index": index, "text": new_text,
                          "logprobs": completion_logprobs(tokenizer, completion, token_start, text_start),
                          "finish_reason": completion.finish_reason}  # fmt: skip
            if token_ids:
                choice["token_ids"] = list(new_tokens)
            choices.append(choice)
        if output.finished:
            finished.append(output)
            on_finished(output)
        if choices:
            yield sse({**base, "created": int(time.time()), "choices": choices})
    if include_usage:
        yield sse(
            {
                **base,
                "created": int(time.time()),
                "choices": [],
                "usage": usage_of(finished) if finished else usage(0, 0),
            }
        )
    yield sse("[DONE]")
