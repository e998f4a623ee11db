"""SamplingParams: vLLM defaults, one UserInputError per invalid field, normalised stop conditions."""

import pytest

from kiln.core.errors import UserInputError
from kiln.runtime.sampling_params import SamplingParams

INVALID = [
    ("n", 0),
    ("n", 1.5),
    ("n", True),
    ("max_tokens", 0),
    ("max_tokens", "16"),
    ("min_tokens", -1),
    ("min_tokens", 17),  # above max_tokens=16
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_k", -2),
    ("top_k", 2.0),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -3.0),
    ("seed", 1.0),
    ("seed", False),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [3]),
    ("stop", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 5),
    ("ignore_eos", 1),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", True),
    ("prompt_logprobs", 21),
    ("skip_special_tokens", None),
    ("include_stop_str_in_output", "yes"),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(UserInputError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**{field: value})


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert (params.n, params.max_tokens, params.min_tokens) == (1, 16, 0)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
    assert params.stop == () and params.stop_token_ids == ()
    assert params.logprobs is None and params.skip_special_tokens and not params.is_greedy


def test_edges_of_ranges_are_accepted() -> None:
    params = SamplingParams(
        max_tokens=4, min_tokens=4, temperature=0, top_p=1, top_k=-1, min_p=1, presence_penalty=-2,
        frequency_penalty=2, seed=-7, logprobs=0, prompt_logprobs=20,
    )  # fmt: skip
    assert params.is_greedy
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)


def test_stop_conditions_are_normalised_to_tuples() -> None:
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)
    assert SamplingParams(stop=["x"]) == SamplingParams(stop=("x",))
    hash(SamplingParams(stop=["x"], stop_token_ids=[1]))  # frozen and hashable once normalised


def test_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]
