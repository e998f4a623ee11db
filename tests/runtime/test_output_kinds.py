"""What each step's outputs carry: everything so far, only the new part, or only the final output."""

from pathlib import Path

import pytest
from engine_workloads import prompts

from kiln import LLM
from kiln import RequestOutputKind as TopLevelKind
from kiln.core.errors import UserInputError
from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.outputs import RequestOutput, RequestOutputKind
from kiln.runtime.sampling_params import SamplingParams


def every_step(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    engine.add_request(prompt, params, request_id="r")
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    return outputs


def sampling(kind: RequestOutputKind, stop: str | None = None) -> SamplingParams:
    return SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=16, logprobs=1, stop=stop, output_kind=kind)


@pytest.mark.parametrize("with_stop", [False, True], ids=["length", "stop-string"])
def test_deltas_add_up_to_the_cumulative_output(tiny_llama_dir: Path, with_stop: bool) -> None:
    config = EngineConfig(dtype="fp32", device="cpu", num_kv_blocks=64)
    prompt = prompts()[3]
    stop = None
    if with_stop:
        free = every_step(LLMEngine(tiny_llama_dir, config), prompt, sampling(RequestOutputKind.CUMULATIVE))[-1]
        stop = free.outputs[0].text[len(free.outputs[0].text) // 2 :][:2]
    cumulative = every_step(LLMEngine(tiny_llama_dir, config), prompt, sampling(RequestOutputKind.CUMULATIVE, stop))
    deltas = every_step(LLMEngine(tiny_llama_dir, config), prompt, sampling(RequestOutputKind.DELTA, stop))
    assert len(deltas) == len(cumulative) > 2 and deltas[-1].finished
    final = cumulative[-1]
    for index in range(2):
        parts = [output.outputs[index] for output in deltas]
        assert "".join(part.text for part in parts) == final.outputs[index].text
        assert [t for part in parts for t in part.token_ids] == final.outputs[index].token_ids
        assert [e for part in parts for e in part.logprobs] == final.outputs[index].logprobs
        assert parts[-1].finish_reason == final.outputs[index].finish_reason
    if with_stop:
        assert final.outputs[0].finish_reason == "stop"
    # A step's delta holds that step's token alone, never the whole history.
    assert max(len(output.outputs[0].token_ids) for output in deltas) == 1


def test_final_only_reports_once_when_the_request_ends(tiny_llama_dir: Path) -> None:
    engine = LLMEngine(tiny_llama_dir, EngineConfig(dtype="fp32", device="cpu", num_kv_blocks=64))
    outputs = every_step(engine, prompts()[2], sampling(RequestOutputKind.FINAL_ONLY))
    expected = every_step(
        LLMEngine(tiny_llama_dir, EngineConfig(dtype="fp32", device="cpu", num_kv_blocks=64)),
        prompts()[2],
        sampling(RequestOutputKind.CUMULATIVE),
    )[-1]
    assert len(outputs) == 1 and outputs[0].finished
    assert [c.token_ids for c in outputs[0].outputs] == [c.token_ids for c in expected.outputs]
    assert [c.text for c in outputs[0].outputs] == [c.text for c in expected.outputs]


def test_generate_returns_whole_outputs_whatever_kind_was_asked(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="fp32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    whole = llm.generate([prompts()[1]], params)[0]
    delta = llm.generate([prompts()[1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                        output_kind=RequestOutputKind.DELTA))[0]  # fmt: skip
    assert len(whole.token_ids) == 8 and delta.token_ids == whole.token_ids and delta.text == whole.text


def test_a_string_for_output_kind_is_refused() -> None:
    assert TopLevelKind is RequestOutputKind  # `from kiln import RequestOutputKind` works
    with pytest.raises(UserInputError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind="delta")  # type: ignore[arg-type]
