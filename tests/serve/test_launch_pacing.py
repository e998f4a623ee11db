"""Paced launches (serve/launch_pacing.py): when the server launches the next step, and that arrivals never wait.

The pacer's arithmetic on synthetic clocks; then the server's engine thread over a CPU engine with async
scheduling, with launches held far into the future: steps still run, and a request that arrives during a
held launch is taken at once and gets its tokens (the hold would otherwise last 30 s).
"""

import asyncio
import time
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_clock import StepClock
from kiln.serve.async_engine import AsyncEngine
from kiln.serve.launch_pacing import MARGIN_SECONDS, MIN_SAMPLES, LaunchPacer

STEP = 0.005  # GPU time of a decode step
LAUNCH = 0.001  # host time of its launch


def steady_steps(pacer: LaunchPacer, clock: StepClock, count: int, start: float = 100.0) -> float:
    """Back-to-back decode steps: each launched while the previous runs, read back one GPU step apart."""
    now = start
    for _ in range(count):
        clock.launched_at, clock.launch_seconds, clock.launched_decode_only = now + LAUNCH, LAUNCH, True
        now += STEP
        clock.read_back_at = now
        pacer.observe(clock)
    return now


def test_no_pacing_until_it_has_seen_enough_steps() -> None:
    pacer, clock = LaunchPacer(), StepClock()
    steady_steps(pacer, clock, MIN_SAMPLES)  # MIN_SAMPLES launches but one interval fewer
    assert pacer.launch_at(clock) is None
    steady_steps(pacer, clock, 1, start=clock.read_back_at)
    assert pacer.launch_at(clock) is not None


def test_launch_is_held_until_the_step_in_flight_is_nearly_done() -> None:
    pacer, clock = LaunchPacer(), StepClock()
    end = steady_steps(pacer, clock, 10)
    # The step in flight started at the last read-back; it should end one step later, less the lead.
    assert pacer.launch_at(clock) == pytest.approx(end + STEP - LAUNCH - MARGIN_SECONDS)


def test_late_launches_and_prefills_do_not_push_the_launch_later() -> None:
    pacer, clock = LaunchPacer(), StepClock()
    end = steady_steps(pacer, clock, 10)
    for _ in range(3):  # steps read back 3 ms later than a GPU step (the host was late), and a long prefill launch
        clock.launched_at, clock.launch_seconds, clock.launched_decode_only = end + 0.02, 0.02, False
        end += STEP + 0.003
        clock.read_back_at = end
        pacer.observe(clock)
    clock.launched_at = end - 0.001  # the step in flight was launched before the last read-back
    assert pacer.launch_at(clock) == pytest.approx(end + STEP - LAUNCH - MARGIN_SECONDS)


def test_a_slow_decode_launch_makes_the_lead_longer() -> None:
    pacer, clock = LaunchPacer(), StepClock()
    end = steady_steps(pacer, clock, 10)
    clock.launched_at, clock.launch_seconds, clock.launched_decode_only = end + 0.004, 0.004, True
    clock.read_back_at = end + STEP
    pacer.observe(clock)
    assert pacer.launch_at(clock) == pytest.approx(clock.read_back_at + STEP - 0.004 - MARGIN_SECONDS)


class HeldPacer(LaunchPacer):
    """Holds the first launch asked about for 30 s, and each later one for `then` seconds (None: not at all)."""

    then: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self.holds = 0

    def launch_at(self, clock: StepClock) -> float | None:
        self.holds += 1
        hold = 30.0 if self.holds == 1 else self.then
        return None if hold is None else time.monotonic() + hold


def paced_engine(model_dir: Path, monkeypatch: pytest.MonkeyPatch, then: float | None) -> AsyncEngine:
    monkeypatch.setattr(HeldPacer, "then", then)
    monkeypatch.setattr("kiln.serve.async_engine.LaunchPacer", HeldPacer)
    config = EngineConfig(dtype="fp32", device="cpu", num_kv_blocks=64, async_scheduling=True)
    return AsyncEngine(LLMEngine(model_dir, config))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("paced") / "llama", with_tokenizer=False)


async def generate_all(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    token_ids: list[int] = []
    async for output in engine.generate(prompt, params):
        token_ids = output.outputs[0].token_ids
    return list(token_ids)


def test_an_arrival_ends_a_held_launch_at_once(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = paced_engine(model_dir, monkeypatch, then=None)

    async def scenario() -> list[list[int]]:
        first = asyncio.ensure_future(generate_all(engine, [1, 2, 3], 4))
        await asyncio.sleep(0.5)  # the first request's second launch is held for 30 s by now
        second = await generate_all(engine, [4, 5], 4)
        return [await first, second]

    try:
        started = time.monotonic()
        results = asyncio.run(asyncio.wait_for(scenario(), timeout=20))
        assert time.monotonic() - started < 15  # the arrival, not the 30 s hold, let the engine go on
        assert engine._pacer.holds >= 2 and [len(tokens) for tokens in results] == [4, 4]
    finally:
        engine.shutdown()


def test_held_launches_still_run_every_step(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = paced_engine(model_dir, monkeypatch, then=0.05)
    engine._pacer.holds = 1  # no 30 s hold: every launch is held 50 ms, and nothing arrives to end one early
    try:
        tokens = asyncio.run(asyncio.wait_for(generate_all(engine, [1, 2, 3], 6), timeout=20))
        assert len(tokens) == 6 and engine._pacer.holds >= 5
    finally:
        engine.shutdown()
