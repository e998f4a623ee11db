"""The official `openai` client against a live `kiln serve`: completions, chat, streaming, n, logprobs, usage."""

from __future__ import annotations

import pytest
from live_server import API_KEY, MODEL_NAME
from openai import OpenAI

from kiln import LLM, SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def test_models(client) -> None:
    (model,) = client.models.list().data
    assert model.id == MODEL_NAME


def test_greedy_completion_equals_kiln_run(client, server) -> None:
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    llm = LLM(str(server.checkpoint), device="cpu", num_kv_blocks=64)
    (expected,) = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))
    assert response.choices[0].text == expected.text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_chat_and_n2_and_logprobs(client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a capital."}]
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_completion_tokens=8, n=2, temperature=1.0, seed=3,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    assert [choice.index for choice in response.choices] == [0, 1]
    for choice in response.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        content = choice.logprobs.content
        assert 1 <= len(content) <= 8 and all(len(item.top_logprobs) <= 3 for item in content)
        assert all(item.logprob <= 0 for item in content)
    assert response.usage.completion_tokens == sum(len(c.logprobs.content) for c in response.choices)


def test_streamed_completion_matches_the_unstreamed_one(client) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens and not chunks[-1].choices


def test_return_token_ids_in_streamed_and_full_completions(client) -> None:
    # vLLM's extension: each choice, and each streamed chunk's choice, carries its (new) token ids.
    ask = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**ask, extra_body={"return_token_ids": True})
    token_ids = full.choices[0].token_ids
    assert len(token_ids) == full.usage.completion_tokens and all(isinstance(t, int) for t in token_ids)
    chunks = list(client.completions.create(**ask, stream=True, extra_body={"return_token_ids": True}))
    assert [t for chunk in chunks for choice in chunk.choices for t in choice.token_ids] == token_ids
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == full.choices[0].text
    plain = client.completions.create(**ask)
    assert getattr(plain.choices[0], "token_ids", None) is None  # only when asked


def test_streamed_chat(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.usage is None for chunk in chunks)


def test_token_id_and_list_prompts(client) -> None:
    response = client.completions.create(model=MODEL_NAME, prompt=[[1, 2, 3], [4, 5]], max_tokens=3, n=2, temperature=0)
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == 5
