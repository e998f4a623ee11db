"""How often CPython hands the GIL between the engine thread and the HTTP event loop.

The server runs the engine on its own thread (serve/async_engine.py). A step is mostly Python between
kernel launches, and a thread waiting for the GIL gets it only when the holder blocks or after the switch
interval, 5 ms by default. The event loop needs the GIL to parse a request and again to write each streamed
chunk, so every hand-over could add up to 5 ms to a request's time to first token. A shorter interval
costs the engine thread a few microseconds per forced switch, and only while the event loop has work.
KILN_GIL_SWITCH_INTERVAL_MS overrides the server's setting (0 keeps CPython's).
"""

from __future__ import annotations

import sys

from kiln.core.env_numbers import number_from_env

SERVER_SWITCH_INTERVAL_MS = 0.5


def set_server_switch_interval() -> float:
    """Set the interpreter's switch interval for serving; returns the interval in effect, in seconds."""
    interval_ms = number_from_env(
        "KILN_GIL_SWITCH_INTERVAL_MS", float, SERVER_SWITCH_INTERVAL_MS, "a number of milliseconds >= 0", "ignored",
        accept=lambda value: value >= 0,  # NaN too is refused
    )  # fmt: skip
    if interval_ms is None:
        return sys.getswitchinterval()
    if interval_ms > 0:
        sys.setswitchinterval(interval_ms / 1000)
    return sys.getswitchinterval()
