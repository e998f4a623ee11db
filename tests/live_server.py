"""A live `kiln serve` process on 127.0.0.1 (imported by the server tests as `live_server`)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

API_KEY = "test-key"
MODEL_NAME = "tiny"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class LiveServer:
    url: str
    port: int
    process: subprocess.Popen
    checkpoint: Path

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                auth: bool = True) -> Reply:  # fmt: skip
        """One plain HTTP request (stdlib only, so raw bytes and odd headers go out exactly as given)."""
        all_headers = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def get(self, path: str, auth: bool = True) -> Reply:
        return self.request("GET", path, auth=auth)

    def post(self, path: str, body: bytes | dict, headers: dict | None = None, auth: bool = True) -> Reply:
        return self.request("POST", path, body, headers, auth)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, *args: str) -> LiveServer:
    """`kiln serve` in a subprocess; returns once /health says ready."""
    port = free_port()
    command = [sys.executable, "-m", "kiln.cli.main", "serve", str(checkpoint), "--port", str(port)]
    command += ["--served-model-name", MODEL_NAME, "--device", "cpu", "--max-seq-len", "256", *args]
    env = {**os.environ, "KILN_API_KEY": API_KEY}
    # Its log goes to a file: a pipe nobody reads would fill up and block the server's event loop.
    log = tempfile.NamedTemporaryFile("w+", prefix="kiln-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = LiveServer(f"http://127.0.0.1:{port}", port, process, checkpoint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {process.returncode}: {Path(log.name).read_text()[-3000:]}")
        try:
            if server.get("/health").status == 200:
                return server
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("kiln serve did not become ready in 120 s")


def stop_server(server: LiveServer) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode
