"""The FastAPI application: OpenAI-compatible endpoints over an AsyncEngine, with auth, limits and metrics."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.core.errors import KilnError
from kiln.core.version import __version__
from kiln.runtime.outputs import RequestOutput, RequestOutputKind
from kiln.serve.async_engine import AsyncEngine, EngineStats
from kiln.serve.metrics import ServerMetrics
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from kiln.serve.responses import chat_body, completion_body, error_response, new_id
from kiln.serve.streaming import merged, stream_completion

OPEN_PATHS = ("/health", "/metrics", "/version")
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streamed request checks that its client is still there


class ApiError(Exception):
    """A request the server answers with an OpenAI-style error."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


@dataclass
class ServerSettings:
    """What `kiln serve` configures besides the engine."""

    served_model_name: str
    api_key: str | None = None
    max_queue: int = 512  # requests held (running + waiting) before new ones get 503
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass
class EngineSlot:
    """The engine, once loaded: the server answers /health (503) while the model loads."""

    engine: AsyncEngine | None = None
    load_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self) -> AsyncEngine:
        if self.engine is None:
            raise ApiError(503, self.load_error or "the model is loading; retry shortly", headers={"Retry-After": "5"})
        return self.engine


class GuardMiddleware:
    """Auth, body size and request counting, as plain ASGI (streams pass through untouched)."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, counted_send)
            else:
                await self.app(scope, self._limited(receive), counted_send)
        finally:
            self.metrics.requests.labels(endpoint=scope["path"], status=str(status["code"])).inc()

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        if self.settings.api_key and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return error_response(413, f"request body over {self.settings.max_body_bytes} bytes")
        return None

    def _limited(self, receive: Any) -> Any:
        """Bodies without a Content-Length are counted as they arrive."""
        seen = {"bytes": 0}

        async def limited_receive() -> dict:
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            if seen["bytes"] > self.settings.max_body_bytes:
                raise ApiError(413, f"request body over {self.settings.max_body_bytes} bytes")
            return message

        return limited_receive


def create_app(slot: EngineSlot, settings: ServerSettings) -> FastAPI:
    """The app over an engine slot that the caller fills once the model has loaded."""
    app = FastAPI(title="kiln", version=__version__, docs_url=None, redoc_url=None)
    metrics = ServerMetrics(settings.served_model_name)
    app.state.metrics = metrics

    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {message}")
        return error_response(400, f"{where or 'body'}: {message}", param=where or None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI's words for bad bytes
            return error_response(400, "the body is not valid JSON (or not UTF-8); send a JSON object")
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> Any:
        if slot.engine is None:
            return error_response(503, slot.load_error or "the model is loading")
        return PlainTextResponse("ok")

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Any:
        stats = slot.engine.stats if slot.engine is not None else EngineStats()
        return PlainTextResponse(metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "kiln",
                "max_model_len": slot.get().engine.limits.max_seq_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    def check(body: SamplingFields) -> AsyncEngine:
        engine = slot.get()
        if body.model != settings.served_model_name:
            served = settings.served_model_name
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {served!r}", "model")
        if engine.num_unfinished() >= settings.max_queue:
            raise ApiError(503, f"the server holds {settings.max_queue} requests; retry shortly",
                           headers={"Retry-After": "1"})  # fmt: skip
        return engine

    def encode(engine: AsyncEngine, text: str) -> list[int]:
        tokenizer = engine.engine.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send token ids as the prompt", "prompt")
        return tokenizer(text).input_ids

    def params_for(
        engine: AsyncEngine,
        body: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
    ) -> Any:
        max_seq_len, vocab = engine.engine.limits.max_seq_len, engine.engine.model_config.vocab_size
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise ApiError(400, "the prompt is empty", "prompt")
        if any(p and (min(p) < 0 or max(p) >= vocab) for p in prompts):  # min/max: C loops, not a generator
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
        room = max_seq_len - longest
        if max_tokens is None:
            max_tokens = room
        if room < 1 or longest + max_tokens > max_seq_len:
            raise ApiError(400, f"this model's maximum context length is {max_seq_len} tokens; the request has "
                           f"{longest} prompt tokens and asks for {max_tokens} more", "max_tokens")  # fmt: skip
        try:
            return body.sampling_params(max_tokens, logprobs)
        except KilnError as exc:
            raise ApiError(400, str(exc)) from exc

    def finished(output: RequestOutput) -> None:
        metrics.observe_finished(output)

    async def collect_or_abort(http: Request, streams: list) -> list[RequestOutput]:
        """All prompts' final outputs (run together); a client that hangs up aborts them."""

        async def collect() -> list[RequestOutput]:
            outputs: dict[int, RequestOutput] = {}
            async for index, output in merged(streams):
                if output.finished:
                    finished(output)
                    outputs[index] = output
            return [outputs[i] for i in range(len(streams))]

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await http.is_disconnected():
                task.cancel()  # cancels the requests' generators, which abort them in the engine
                await asyncio.gather(task, return_exceptions=True)
                raise ApiError(499, "the client closed the connection")
        try:
            return task.result()
        except KilnError as exc:
            raise ApiError(400, str(exc)) from exc

    async def respond(
        engine: AsyncEngine, http: Request, body: SamplingFields, prompts: list[list[int]], params: Any, chat: bool,
        top_n: int, arrival: float,
    ) -> Any:  # fmt: skip
        tokenizer = engine.engine.tokenizer
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if not body.stream:  # only the final output is read: no per-step copies cross to this thread
            params = replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
        # Submitted before the response starts: the headers go out while the engine runs the prompts.
        streams = [engine.generate(prompt, params, arrival) for prompt in prompts]
        model = settings.served_model_name
        if body.stream:
            base = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                    "model": model}  # fmt: skip
            num_choices = params.n * len(prompts)
            events = stream_completion(
                streams, base, num_choices, tokenizer, body.include_usage, chat, top_n, finished,
                token_ids=body.return_token_ids,
            )  # fmt: skip
            return StreamingResponse(events, media_type="text/event-stream")
        outputs = await collect_or_abort(http, streams)
        if chat:
            return chat_body(request_id, model, outputs[0], tokenizer, top_n, body.return_token_ids)
        return completion_body(request_id, model, outputs, tokenizer, body.return_token_ids)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        arrival = time.monotonic()  # starts the request's TTFT and queue time (metrics)
        engine = check(body)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [encode(engine, prompt)]
        elif prompt and isinstance(prompt[0], int):  # the protocol's union has homogeneous lists only
            prompts = [list(prompt)]
        else:
            prompts = [encode(engine, p) if isinstance(p, str) else list(p) for p in prompt]
        if not prompts:
            raise ApiError(400, "the prompt is empty", "prompt")
        params = params_for(engine, body, prompts, body.max_tokens, body.logprobs)
        return await respond(engine, http, body, prompts, params, chat=False, top_n=body.logprobs or 0, arrival=arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        arrival = time.monotonic()
        engine = check(body)
        tokenizer = engine.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from exc
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        params = params_for(engine, body, [prompt], body.requested_max_tokens(), body.requested_logprobs())
        return await respond(
            engine, http, body, [prompt], params, chat=True, top_n=body.top_logprobs or 0, arrival=arrival
        )

    return app
