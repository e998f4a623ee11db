"""The OpenAI request bodies kiln accepts (pydantic), and how they become SamplingParams.

Field names, types and defaults follow OpenAI's completions and chat-completions APIs, plus the
sampling extensions vLLM users send (top_k, min_p, repetition_penalty, ignore_eos). Unknown fields
are ignored, as OpenAI's own server does; wrong types and values are 400s with the field named.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kiln.runtime.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs; completions' logprobs allows up to 5 there


class StreamOptions(BaseModel):
    """`stream_options`: ask for a final chunk that carries `usage`."""

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields the two endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension: every choice (every streamed chunk's choice) also carries its new token ids, so a
    # client can count tokens exactly, also from a model without a tokenizer (whose text stays empty).
    return_token_ids: bool = False

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Our SamplingParams (which validates the combination once more)."""
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Literal[False] = False  # echoing the prompt back is not supported


class ChatMessage(BaseModel):
    """One message; content parts other than text are refused (the models are text-only)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported; send text")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (the current name) or max_tokens (the deprecated one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Top-k logprobs per token for SamplingParams (None when logprobs is off)."""
        return (self.top_logprobs or 0) if self.logprobs else None
