"""OpenAI response bodies (completions, chat completions, their stream chunks, usage, logprobs, errors)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from kiln.runtime.outputs import CompletionOutput, RequestOutput

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 499: "client_closed_request", 503: "service_unavailable",
               500: "internal_error"}  # fmt: skip


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}  # fmt: skip
    return JSONResponse(body, status_code=status, headers=headers)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def sse(data: dict[str, Any] | str) -> str:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def completion_logprobs(tokenizer: Any, completion: CompletionOutput, start: int, text_offset: int) -> dict | None:
    """The completions API's logprobs object for tokens [start:] of a completion."""
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, top in zip(completion.token_ids[start:], completion.logprobs[start:]):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(top.get(token_id))
        top_logprobs.append({_token_text(tokenizer, t): lp for t, lp in top.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, completion: CompletionOutput, start: int, top_n: int) -> dict | None:
    """The chat API's logprobs object ({"content": [...]}) for tokens [start:] of a completion."""
    if completion.logprobs is None:
        return None
    content = []
    for token_id, top in zip(completion.token_ids[start:], completion.logprobs[start:]):
        text = _token_text(tokenizer, token_id)
        ranked = sorted(top.items(), key=lambda item: -item[1])[:top_n]
        content.append({
            "token": text, "logprob": top.get(token_id), "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, i)), "logprob": lp, "bytes": list(t.encode())}
                             for i, lp in ranked],
        })  # fmt: skip
    return {"content": content}


def completion_body(
    request_id: str, model: str, outputs: list[RequestOutput], tokenizer: Any, token_ids: bool = False
) -> dict[str, Any]:
    """Non-streamed /v1/completions body: n choices per prompt, indexed prompt-major (`token_ids`: with them)."""
    choices = []
    for prompt_index, output in enumerate(outputs):
        for completion in output.outputs:
            choices.append({
                "index": prompt_index * len(output.outputs) + completion.index, "text": completion.text,
                "logprobs": completion_logprobs(tokenizer, completion, 0, 0),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason,
                **({"token_ids": list(completion.token_ids)} if token_ids else {}),
            })  # fmt: skip
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_of(outputs)}  # fmt: skip


def chat_body(
    request_id: str, model: str, output: RequestOutput, tokenizer: Any, top_n: int, token_ids: bool = False
) -> dict[str, Any]:
    """Non-streamed /v1/chat/completions body (`token_ids`: each choice with its token ids)."""
    choices = [{
        "index": completion.index, "message": {"role": "assistant", "content": completion.text},
        "logprobs": chat_logprobs(tokenizer, completion, 0, top_n),
        "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason,
        **({"token_ids": list(completion.token_ids)} if token_ids else {}),
    } for completion in output.outputs]  # fmt: skip
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_of([output])}  # fmt: skip


def usage_of(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return usage(prompt, completion)
