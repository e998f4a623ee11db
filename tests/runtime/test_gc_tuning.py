"""The engine's garbage-collector setting (runtime/gc_tuning.py): raised, never lowered, and optional."""

import gc

import pytest

from kiln.runtime.gc_tuning import YOUNG_GENERATION_THRESHOLD, tune_garbage_collector


@pytest.fixture
def gc_threshold():
    saved = gc.get_threshold()
    gc.set_threshold(700, saved[1], saved[2])  # Python's default youngest-generation threshold
    yield
    gc.set_threshold(*saved)


def test_threshold_is_raised_and_never_lowered(gc_threshold, monkeypatch) -> None:
    monkeypatch.delenv("KILN_GC_THRESHOLD", raising=False)
    middle, old = gc.get_threshold()[1:]
    tune_garbage_collector()
    assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, middle, old)
    gc.set_threshold(50_000, middle, old)  # someone's own, higher setting stays
    tune_garbage_collector()
    assert gc.get_threshold()[0] == 50_000


def test_threshold_from_the_environment(gc_threshold, monkeypatch, caplog) -> None:
    monkeypatch.setenv("KILN_GC_THRESHOLD", "0")  # off: the process keeps its setting
    tune_garbage_collector()
    assert gc.get_threshold()[0] == 700
    monkeypatch.setenv("KILN_GC_THRESHOLD", "2000")
    tune_garbage_collector()
    assert gc.get_threshold()[0] == 2000
    monkeypatch.setenv("KILN_GC_THRESHOLD", "lots")
    tune_garbage_collector()
    assert gc.get_threshold()[0] == 2000 and "KILN_GC_THRESHOLD='lots' is not an integer" in caplog.text
