"""The server's GIL switch interval (serve/gil_switch.py): shortened by default, settable, never broken by bad input."""

import sys

import pytest

from kiln.serve.gil_switch import SERVER_SWITCH_INTERVAL_MS, set_server_switch_interval


@pytest.fixture
def switch_interval():
    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default
    yield
    sys.setswitchinterval(saved)


def test_server_shortens_the_interval(switch_interval, monkeypatch) -> None:
    monkeypatch.delenv("KILN_GIL_SWITCH_INTERVAL_MS", raising=False)
    assert set_server_switch_interval() == pytest.approx(SERVER_SWITCH_INTERVAL_MS / 1000)
    assert sys.getswitchinterval() == pytest.approx(SERVER_SWITCH_INTERVAL_MS / 1000)
    assert SERVER_SWITCH_INTERVAL_MS < 5  # shorter than CPython's default


@pytest.mark.parametrize(("value", "expected"), [("2", 0.002), ("0", 0.005), ("fast", 0.005), ("-1", 0.005)])
def test_interval_from_the_environment(switch_interval, monkeypatch, caplog, value, expected) -> None:
    monkeypatch.setenv("KILN_GIL_SWITCH_INTERVAL_MS", value)
    assert set_server_switch_interval() == pytest.approx(expected)
    assert sys.getswitchinterval() == pytest.approx(expected)
    assert ("not a number of milliseconds" in caplog.text) == (value in ("fast", "-1"))
