"""Rank 0's messages to the other ranks of one machine, through a shared-memory file: microseconds, not gloo's ms.

A tensor-parallel decode step at batch 1 lasts ~3 ms on the GPU, and every worker starts its part only
once it has the step; the gloo object broadcast cost ~1 ms of that, in series. Here rank 0 pickles the
message into a memory-mapped file and bumps a sequence number; workers spin on the number (then back
off to short sleeps once idle), read the message and acknowledge it. One slot: rank 0 waits for every
acknowledgement of the previous message before writing, which in practice never waits (a worker reads
a step before it runs it, and the step's collectives finish after that).

Layout: [sequence u64][length u64][acknowledged sequence u64 per reader][payload]. The payload is written
before the sequence number: x86's stores stay in order, and CPython does not reorder them.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

_U64 = struct.Struct("<Q")
_SPIN_S = 1.0  # after a message, poll without sleeping this long: steps follow each other within ms
_IDLE_SLEEP_S = 0.0005  # then poll every half millisecond (the first step after an idle spell pays it)
_CHECK_EVERY = 2000  # polls between liveness checks while spinning


class ChannelClosed(Exception):
    """The other side is gone (rank 0 exited, or a reader died): nothing more will come through."""


class PeerGone(ChannelClosed):
    """The other side's process closed its end (it stopped), as opposed to a reader that is late."""


class OversizeMessage:
    """Placeholder sent instead of a message larger than the channel: the reader fetches it another way."""


class StepChannel:
    """One writer (rank 0), `num_readers` readers (ranks 1..N-1), one message in flight."""

    def __init__(self, path: str, num_readers: int, capacity: int, create: bool) -> None:
        self.path = path
        self.num_readers = num_readers
        self.capacity = capacity
        self._payload_offset = 16 + 8 * num_readers
        size = self._payload_offset + capacity
        if create:
            with open(path, "wb") as file:
                file.truncate(size)
        with open(path, "r+b") as file:
            self._memory = mmap.mmap(file.fileno(), size)
        self._sequence = 0

    @classmethod
    def create(cls, num_readers: int, capacity: int = 32 * 2**20) -> StepChannel:
        """A new channel file in shared memory (/dev/shm when there is one, else the temp directory)."""
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        handle, path = tempfile.mkstemp(prefix="kiln-steps-", dir=directory)
        os.close(handle)
        return cls(path, num_readers, capacity, create=True)

    def _read_u64(self, offset: int) -> int:
        return _U64.unpack_from(self._memory, offset)[0]

    def send(self, message: Any, alive: Callable[[], bool], timeout_s: float) -> bool:
        """Write a message for every reader; False (an OversizeMessage went instead) when it does not fit."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        fits = len(data) <= self.capacity
        if not fits:
            data = pickle.dumps(OversizeMessage())
        self._wait(lambda: all(self._read_u64(16 + 8 * i) == self._sequence for i in range(self.num_readers)),
                   alive, timeout_s)  # fmt: skip
        start = self._payload_offset
        self._memory[start : start + len(data)] = data
        _U64.pack_into(self._memory, 8, len(data))
        self._sequence += 1
        _U64.pack_into(self._memory, 0, self._sequence)  # last: publishes the message
        return fits

    def receive(self, reader: int, alive: Callable[[], bool]) -> Any:
        """Reader `reader` (0-based): wait for the next message, acknowledge it, return it."""
        self._wait(lambda: self._read_u64(0) != self._sequence, alive, timeout_s=None)
        self._sequence = self._read_u64(0)
        length = self._read_u64(8)
        start = self._payload_offset
        message = pickle.loads(self._memory[start : start + length])
        _U64.pack_into(self._memory, 16 + 8 * reader, self._sequence)
        return message

    @staticmethod
    def _wait(ready: Callable[[], bool], alive: Callable[[], bool], timeout_s: float | None) -> None:
        """Poll `ready`: spinning at first, then sleeping between polls; `alive` is checked now and then."""
        started = time.monotonic()
        polls = 0
        while not ready():
            polls += 1
            waited = time.monotonic() - started
            if waited > _SPIN_S:
                time.sleep(_IDLE_SLEEP_S)
            if polls % _CHECK_EVERY == 0 or waited > _SPIN_S:
                if not alive():
                    raise PeerGone("the other side of the step channel is gone")
                if timeout_s is not None and waited > timeout_s:
                    raise ChannelClosed(f"no reader took the previous message within {timeout_s:.0f} s")

    def close(self, unlink: bool) -> None:
        """Unmap the file; the writer also deletes it."""
        self._memory.close()
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
