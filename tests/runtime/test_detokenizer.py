"""Incremental detokenization with a real byte-level BPE tokenizer: exact text, stop strings, UTF-8."""

import pytest
from tiny_models import make_tiny_tokenizer
from transformers import PreTrainedTokenizerBase

from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.sampling_params import SamplingParams

SENTENCE = "The capital of France is Paris. The capital of Italy is Rome."
UNICODE = "Café crème, 日本語 🙂! Ça coûte 5 €."


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return make_tiny_tokenizer(320)


def run(
    tokenizer: PreTrainedTokenizerBase, text: str, params: SamplingParams, prompt: str = "Kiln says:"
) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Push every token of `text`, stopping like the engine would; return the pushes, finish() and the detokenizer."""
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt, add_special_tokens=False), params)
    pushes = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        pushes.append(detokenizer.push(token_id))
        if detokenizer.stopped_by is not None:
            break
    return pushes, detokenizer.finish(), detokenizer


@pytest.mark.parametrize("text", [SENTENCE, UNICODE, (SENTENCE + " " + UNICODE) * 12])
def test_pushes_add_up_to_the_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    pushes, tail, detokenizer = run(tokenizer, text, SamplingParams())
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "".join(pushes) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detokenizer.text == text and detokenizer.stopped_by is None
    assert tail == ""  # nothing was held back at the end


def test_multibyte_characters_never_surface_half_decoded(tokenizer: PreTrainedTokenizerBase) -> None:
    pushes, _, _ = run(tokenizer, UNICODE, SamplingParams())
    assert not any("\ufffd" in p for p in pushes)
    # Three bytes per character, one byte per token: each character comes out whole, with its last byte.
    assert {"日", "本", "語"} <= set(pushes)
    assert pushes.count("") >= 8


def test_a_stop_string_across_tokens_ends_the_text_before_it(tokenizer: PreTrainedTokenizerBase) -> None:
    stop = "is Par"  # tokens " is", " ", "Pa", "ris"
    assert not any(stop in tokenizer.decode([i]) for i in tokenizer.encode(SENTENCE, add_special_tokens=False))
    pushes, tail, detokenizer = run(tokenizer, SENTENCE, SamplingParams(stop=["Rome", stop]))
    assert detokenizer.stopped_by == stop
    assert detokenizer.text == "".join(pushes) == "The capital of France "
    assert tail == "" and detokenizer.push(5) == ""  # nothing after a stop

    pushes, _, detokenizer = run(tokenizer, SENTENCE, SamplingParams(stop=stop, include_stop_str_in_output=True))
    assert detokenizer.text == "".join(pushes) == "The capital of France is Par"


def test_the_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    # Both end in the token "ris"; "France" starts earlier.
    _, _, detokenizer = run(tokenizer, SENTENCE, SamplingParams(stop=["Paris", "France is Paris"]))
    assert detokenizer.stopped_by == "France is Paris"
    assert detokenizer.text == "The capital of "


def test_a_possible_stop_prefix_is_held_back_until_it_fails(tokenizer: PreTrainedTokenizerBase) -> None:
    stop = "Paris!"  # never matches: "Paris" is followed by "."
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stop))
    ids = tokenizer.encode(SENTENCE, add_special_tokens=False)
    streamed = ""
    for count, token_id in enumerate(ids, start=1):
        streamed += detokenizer.push(token_id)
        so_far = tokenizer.decode(ids[:count])
        held = max((k for k in range(1, len(stop)) if so_far.endswith(stop[:k])), default=0)
        assert streamed == so_far[: len(so_far) - held]
        if so_far.endswith("Paris"):
            assert streamed.endswith("is ")  # "Paris" may still become "Paris!"
    assert detokenizer.stopped_by is None
    assert streamed + detokenizer.finish() == SENTENCE


def test_held_back_text_is_flushed_by_finish(tokenizer: PreTrainedTokenizerBase) -> None:
    pushes, tail, detokenizer = run(tokenizer, "The capital of It", SamplingParams(stop="Italy"))
    assert "".join(pushes) == "The capital of " and tail == "It"
    assert detokenizer.text == "The capital of It" and detokenizer.stopped_by is None


def test_a_multibyte_stop_string(tokenizer: PreTrainedTokenizerBase) -> None:
    pushes, _, detokenizer = run(tokenizer, UNICODE, SamplingParams(stop="本"))
    assert detokenizer.stopped_by == "本" and detokenizer.text == "".join(pushes) == "Café crème, 日"


def test_a_prompt_ending_inside_a_character_does_not_swallow_output(tokenizer: PreTrainedTokenizerBase) -> None:
    bytes_of_ri = tokenizer.encode("日", add_special_tokens=False)  # three byte tokens
    output = bytes_of_ri[2:] + tokenizer.encode("本 ok", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, bytes_of_ri[:2], SamplingParams())
    text = "".join(detokenizer.push(token_id) for token_id in output) + detokenizer.finish()
    assert text == tokenizer.decode(output) == "\ufffd本 ok"


@pytest.mark.parametrize(("skip", "expected"), [(True, "Paris."), (False, "Paris.</s>")])
def test_special_tokens_follow_skip_special_tokens(
    tokenizer: PreTrainedTokenizerBase, skip: bool, expected: str
) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [1, 2, 3], SamplingParams(skip_special_tokens=skip))
    for token_id in tokenizer.encode("Paris.", add_special_tokens=False) + [tokenizer.eos_token_id]:
        detokenizer.push(token_id)
    detokenizer.finish()
    assert detokenizer.text == expected


@pytest.mark.parametrize("clean_up", [False, True], ids=["rust-decode", "transformers-decode"])
def test_the_direct_rust_decode_only_serves_tokenizers_without_clean_up(
    tokenizer: PreTrainedTokenizerBase, clean_up: bool
) -> None:
    # The direct call skips transformers' wrapper, whose text clean-up it would not apply: a tokenizer
    # that asks for clean-up keeps the wrapper. Either way the pushes add up to the tokenizer's decode.
    original = tokenizer.clean_up_tokenization_spaces
    tokenizer.clean_up_tokenization_spaces = clean_up
    try:
        pushes, tail, detokenizer = run(tokenizer, SENTENCE + " " + UNICODE, SamplingParams())
        assert (detokenizer._backend_decode is None) == clean_up
        ids = tokenizer.encode(SENTENCE + " " + UNICODE, add_special_tokens=False)
        assert "".join(pushes) + tail == tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.clean_up_tokenization_spaces = original
