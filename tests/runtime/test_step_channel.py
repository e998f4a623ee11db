"""The shared-memory step channel: every reader gets every message in order, oversize and dead peers are reported."""

from __future__ import annotations

import threading

import pytest

from kiln.runtime.step_channel import ChannelClosed, OversizeMessage, StepChannel


def test_every_reader_gets_every_message_in_order() -> None:
    writer = StepChannel.create(num_readers=2, capacity=4096)
    readers = [StepChannel(writer.path, 2, 4096, create=False) for _ in range(2)]
    messages = [{"step": i, "ids": list(range(i))} for i in range(50)] + [None]
    received: list[list] = [[], []]

    def read(index: int) -> None:
        while (message := readers[index].receive(index, alive=lambda: True)) is not None:
            received[index].append(message)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        for message in messages:
            assert writer.send(message, alive=lambda: True, timeout_s=10)
        for thread in threads:
            thread.join(timeout=10)
    finally:
        writer.close(unlink=True)
    assert received == [messages[:-1], messages[:-1]]


def test_a_message_larger_than_the_channel_sends_a_placeholder() -> None:
    writer = StepChannel.create(num_readers=1, capacity=256)
    reader = StepChannel(writer.path, 1, 256, create=False)
    try:
        assert not writer.send(list(range(1000)), alive=lambda: True, timeout_s=10)
        assert isinstance(reader.receive(0, alive=lambda: True), OversizeMessage)
    finally:
        writer.close(unlink=True)


def test_a_dead_peer_ends_either_wait() -> None:
    writer = StepChannel.create(num_readers=1, capacity=256)
    reader = StepChannel(writer.path, 1, 256, create=False)
    try:
        writer.send("first", alive=lambda: True, timeout_s=10)
        with pytest.raises(ChannelClosed, match="gone"):  # "first" is unread and the reader is dead
            writer.send("second", alive=lambda: False, timeout_s=10)
        assert reader.receive(0, alive=lambda: True) == "first"
        with pytest.raises(ChannelClosed, match="gone"):  # nothing new, and the writer is dead
            reader.receive(0, alive=lambda: False)
    finally:
        writer.close(unlink=True)
