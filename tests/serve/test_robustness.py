"""Bad input, auth, clients that go away, concurrency and SIGTERM against a live `kiln serve`."""

from __future__ import annotations

import json
import re
import threading

import pytest
from live_server import MODEL_NAME, start_server, stop_server

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_COMPLETION = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD_INPUTS = [
    # name, path, raw body (bytes) or JSON body, expected status, words the message must contain
    ("malformed JSON", COMPLETIONS, b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("invalid UTF-8", COMPLETIONS, b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "JSON"),
    ("wrong type", COMPLETIONS, {**OK_COMPLETION, "max_tokens": "many"}, 400, "max_tokens"),
    ("missing prompt", COMPLETIONS, {"model": MODEL_NAME}, 400, "prompt"),
    ("unknown model", COMPLETIONS, {**OK_COMPLETION, "model": "gpt-9"}, 404, "does not exist"),
    ("empty messages", CHAT, {**OK_CHAT, "messages": []}, 400, "messages"),
    ("bad role", CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("negative max_tokens", COMPLETIONS, {**OK_COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("huge max_tokens", COMPLETIONS, {**OK_COMPLETION, "max_tokens": 10**9}, 400, "maximum context length is 256"),
    ("prompt too long", COMPLETIONS, {**OK_COMPLETION, "prompt": list(range(1, 300))}, 400, "maximum context"),
    ("token id out of range", COMPLETIONS, {**OK_COMPLETION, "prompt": [1, 99999]}, 400, "token ids"),
    ("negative token id", COMPLETIONS, {**OK_COMPLETION, "prompt": [-1, 5]}, 400, "token ids"),
    ("one of several prompts out of range", COMPLETIONS, {**OK_COMPLETION, "prompt": [[1, 2], [3, 99999]]}, 400,
     "token ids"),
    ("empty prompt", COMPLETIONS, {**OK_COMPLETION, "prompt": ""}, 400, "empty"),
    ("temperature", COMPLETIONS, {**OK_COMPLETION, "temperature": -0.5}, 400, "temperature"),
    ("top_p", COMPLETIONS, {**OK_COMPLETION, "top_p": 0}, 400, "top_p"),
    ("n", COMPLETIONS, {**OK_COMPLETION, "n": 0}, 400, "n"),
    ("top_logprobs", CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("image content", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "not supported"),
    ("oversized body", COMPLETIONS, {**OK_COMPLETION, "prompt": "x" * (5 * 1024 * 1024)}, 413, "bytes"),
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,status,words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_an_openai_error(server, name, path, body, status, words) -> None:
    headers = {"Content-Type": "application/json"} if isinstance(body, bytes) else None
    reply = server.post(path, body, headers=headers)
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert words in error["message"], error
    assert error["type"] and error["code"] == status
    assert server.post(COMPLETIONS, OK_COMPLETION).status == 200  # and the server still works


def test_auth(server) -> None:
    assert server.post(COMPLETIONS, OK_COMPLETION, auth=False).status == 401
    wrong = server.post(COMPLETIONS, OK_COMPLETION, headers={"Authorization": "Bearer nope"}, auth=False)
    assert wrong.status == 401 and "API key" in wrong.json()["error"]["message"]
    assert server.get("/v1/models", auth=False).status == 401
    assert server.get("/v1/models").status == 200
    for path in ("/health", "/metrics", "/version"):  # open, for probes and scrapers
        assert server.get(path, auth=False).status == 200


def metric(server, name: str) -> float:
    text = server.get("/metrics").body.decode()
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def stream_request(server, body: dict, read_chunks: int | None) -> list[dict]:
    """POST a streaming request; read all events, or hang up after `read_chunks` of them."""
    conn = server.connection()
    conn.request("POST", COMPLETIONS, body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json", "Authorization": "Bearer test-key"})  # fmt: skip
    response = conn.getresponse()
    assert response.status == 200
    events = []
    for line in response:
        if not line.startswith(b"data: "):
            continue
        if line.strip() == b"data: [DONE]":
            events.append({"done": True})
            break
        events.append(json.loads(line[6:]))
        if read_chunks is not None and len(events) >= read_chunks:
            break
    conn.close()  # hang up (mid-stream when read_chunks was reached)
    return events


def stream_from_clients(server, count: int, max_tokens: int, leave_every: int) -> dict[int, list[dict]]:
    """`count` clients streaming at once; every `leave_every`-th hangs up after two chunks. Events per client."""
    results: dict[int, list[dict]] = {}

    def client(i: int) -> None:
        body = {"model": MODEL_NAME, "prompt": f"client {i} says", "max_tokens": max_tokens, "ignore_eos": True,
                "seed": i}  # fmt: skip
        results[i] = stream_request(server, body, read_chunks=2 if i % leave_every == 0 else None)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def test_64_streaming_clients_some_leaving_early(server) -> None:
    results = stream_from_clients(server, 64, max_tokens=24, leave_every=4)
    assert len(results) == 64
    for i, events in results.items():
        if i % 4:  # stayed: 24 tokens, a finish reason, [DONE]
            assert events[-1] == {"done": True}, i
            assert events[-2]["choices"][0]["finish_reason"] == "length"
    deadline_checks = 50
    while metric(server, "kiln_num_requests_running") and deadline_checks:  # the engine thread catches up
        deadline_checks -= 1
        threading.Event().wait(0.1)
    assert metric(server, "kiln_num_requests_running") == 0
    assert metric(server, "kiln_num_requests_waiting") == 0
    assert metric(server, "kiln_kv_cache_blocks_in_use") == 0
    assert metric(server, "kiln_generation_tokens_total") >= 48 * 24
    assert metric(server, "kiln_time_to_first_token_seconds_count") >= 48
    # TTFT = queue time + prefill time for each request, so their sums agree too
    queued, prefill = (
        metric(server, "kiln_request_queue_time_seconds_sum"),
        metric(server, "kiln_request_prefill_time_seconds_sum"),
    )
    assert queued > 0 and prefill > 0
    assert queued + prefill == pytest.approx(metric(server, "kiln_time_to_first_token_seconds_sum"))


def test_sigterm_lets_running_requests_finish(serve_checkpoint) -> None:
    live = start_server(serve_checkpoint)
    events: list[dict] = []
    body = {"model": MODEL_NAME, "prompt": "long", "max_tokens": 120, "ignore_eos": True}
    reader = threading.Thread(target=lambda: events.extend(stream_request(live, body, None)))
    reader.start()
    threading.Event().wait(1.0)  # the stream is under way
    assert stop_server(live) == 0
    reader.join(timeout=60)
    assert events and events[-1] == {"done": True}
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1] if e.get("choices")) > 0


def test_non_streamed_request_is_aborted_when_its_client_leaves(server) -> None:
    body = {"model": MODEL_NAME, "prompt": "a long answer", "max_tokens": 240, "n": 4, "ignore_eos": True}
    conn = server.connection()
    conn.request("POST", COMPLETIONS, body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": "Bearer test-key"})  # fmt: skip
    threading.Event().wait(0.3)  # generating by now
    conn.close()
    for _ in range(50):
        text = server.get("/metrics").body.decode()
        if 'status="499"' in text and metric(server, "kiln_num_requests_running") == 0:
            break
        threading.Event().wait(0.1)
    assert re.search(r'kiln_requests_total\{endpoint="/v1/completions",status="499"\} 1\.0', text), text
    assert metric(server, "kiln_kv_cache_blocks_in_use") == 0


def test_tensor_parallel_server_answers_and_stops_cleanly(serve_checkpoint) -> None:
    live = start_server(serve_checkpoint, "--tp-size", "2")
    try:
        reply = live.post(COMPLETIONS, {**OK_COMPLETION, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 6
        from kiln import LLM, SamplingParams

        one_rank = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64)
        (expected,) = one_rank.generate(["hello"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        assert reply.json()["choices"][0]["text"] == expected.text
    finally:
        assert stop_server(live) == 0


def test_async_scheduling_server_streams_aborts_and_answers_as_one_step_at_a_time(serve_checkpoint) -> None:
    # What a GPU server runs by default, here on the CPU: steps launched before the last one is read back.
    live = start_server(serve_checkpoint, "--async-scheduling", "--max-batch-size", "8")
    try:
        results = stream_from_clients(live, 12, max_tokens=20, leave_every=3)
        assert len(results) == 12
        for i, events in results.items():
            if i % 3:  # stayed to the end
                assert events[-1] == {"done": True} and events[-2]["choices"][0]["finish_reason"] == "length", i
        body = {**OK_COMPLETION, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "n": 2}
        reply = live.post(COMPLETIONS, body)
        from kiln import LLM, SamplingParams

        waiting = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64)
        (expected,) = waiting.generate(["hello"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert reply.status == 200 and [c["text"] for c in reply.json()["choices"]] == [expected.text] * 2
        for _ in range(50):  # the engine thread frees what the clients that left held
            if metric(live, "kiln_kv_cache_blocks_in_use") == 0 and metric(live, "kiln_num_requests_running") == 0:
                break
            threading.Event().wait(0.1)
        assert metric(live, "kiln_kv_cache_blocks_in_use") == 0
    finally:
        assert stop_server(live) == 0
