"""Running the server: uvicorn in front, the model loading behind it, a graceful stop on SIGTERM.

The port opens at once and /health answers 503 until the engine has loaded, so orchestrators can
tell "starting" from "dead". On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and lets
the requests in flight finish for up to `grace_seconds`; then the engine thread stops and the
process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import uvicorn

from kiln.core.errors import KilnError
from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.torchrun import torchrun_rank
from kiln.serve.app import EngineSlot, ServerSettings, create_app
from kiln.serve.async_engine import AsyncEngine
from kiln.serve.gil_switch import set_server_switch_interval

logger = logging.getLogger(__name__)


def run_server(
    model_dir: Path,
    engine_config: EngineConfig,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace_seconds: float = 30.0,
) -> None:
    """Serve until stopped; raises the KilnError that made loading fail, if one did."""
    if torchrun_rank():  # another rank of a torchrun launch: a worker of rank 0's engine, no server (exits)
        LLMEngine(model_dir, engine_config)
    slot = EngineSlot()
    interval = set_server_switch_interval()  # the engine thread and the event loop share the GIL
    logger.debug("GIL switch interval %.2f ms", interval * 1000)
    config = uvicorn.Config(
        create_app(slot, settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_seconds
    )
    server = uvicorn.Server(config)
    failure: list[KilnError] = []

    def load() -> None:
        try:
            slot.engine = AsyncEngine(LLMEngine(model_dir, engine_config))
            logger.info("serving %s as %r on http://%s:%d", model_dir, settings.served_model_name, host, port)
        except KilnError as exc:
            slot.load_error = f"the model failed to load: {exc}"
            failure.append(exc)
            server.should_exit = True

    loader = threading.Thread(target=load, name="kiln-load", daemon=True)
    loader.start()
    # uvicorn re-raises the signal that stopped it once it has shut down, under the handler that was
    # installed before it: with this one, a graceful stop returns here and the process exits 0.
    previous = {sig: signal.signal(sig, _note_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        loader.join(timeout=1.0)
        if slot.engine is not None:
            slot.engine.shutdown()
    if failure:
        raise failure[0]


def _note_signal(signum: int, _frame: object) -> None:
    logger.info("stopped by signal %d", signum)
