"""The app before its engine has loaded (or after loading failed), called as plain ASGI: no server needed."""

from __future__ import annotations

import asyncio
import json

from kiln.serve.app import EngineSlot, ServerSettings, create_app


def call(app, method: str, path: str, body: bytes = b"") -> tuple[int, dict | str]:
    sent: list[dict] = []
    scope = {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "",
    }  # fmt: skip

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def test_health_and_requests_wait_for_the_model() -> None:
    slot = EngineSlot()
    app = create_app(slot, ServerSettings(served_model_name="m"))
    assert call(app, "GET", "/health")[0] == 503
    assert call(app, "GET", "/version") == (200, {"version": "0.1.0"})
    status, body = call(app, "POST", "/v1/completions", json.dumps({"model": "m", "prompt": "x"}).encode())
    assert status == 503 and "loading" in body["error"]["message"]
    assert call(app, "GET", "/metrics")[0] == 200
    slot.load_error = "the model failed to load: no config.json"
    status, body = call(app, "GET", "/health")
    assert status == 503 and "failed to load" in body["error"]["message"]
