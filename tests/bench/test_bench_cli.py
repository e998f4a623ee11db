"""`kiln bench`: each subcommand end to end on the CPU with the tiny model, reports, comparison, workloads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import invoke

from kiln.bench.report import validate_report
from kiln.bench.workload import synthetic
from kiln.core.errors import ArtifactError

SMALL = ["--num-requests", "6", "--input-len", "12", "--output-len", "5", "--device", "cpu"]


def test_same_seed_same_workload() -> None:
    a, b = synthetic(8, 20, 4, 32000, seed=3, len_std=0.3), synthetic(8, 20, 4, 32000, seed=3, len_std=0.3)
    assert a.requests == b.requests and a.digest == b.digest
    assert synthetic(8, 20, 4, 32000, seed=4, len_std=0.3).digest != a.digest
    assert len({len(r.prompt_token_ids) for r in a.requests}) > 1  # normal lengths vary
    assert all(1000 <= t < 32000 for r in a.requests for t in r.prompt_token_ids)


def test_throughput_with_hf_baseline_writes_a_valid_report(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    args = ["bench", "throughput", str(tiny_checkpoint), *SMALL, "--backend", "hf", "--hf-batch-size", "3"]
    code, stdout, err = invoke(capsys, *args, "-o", str(out), "--json", "--seed", "7")
    assert code == 0, err
    results = validate_report(out)
    kiln, hf = results["runs"]["kiln"], results["runs"]["hf"]
    assert kiln["completed"] == hf["completed"] == 6 and kiln["output_tokens"] == hf["output_tokens"] == 30
    assert kiln["ttft_ms"]["p50"] > 0 and kiln["tpot_ms"] is not None and hf["ttft_ms"] is None
    manifest = json.loads(stdout)
    assert manifest["workload_digest"] == synthetic(6, 12, 5, 320, seed=7).digest
    from kiln.core.artifact import load_artifact

    m = load_artifact(out).manifest
    assert m.spec["command"][:3] == ["kiln", "bench", "throughput"] and m.spec["options"]["seed"] == 7
    resolved = m.spec["options"]["engine_resolved"]  # what ran, defaults included
    assert resolved["device"] == "cpu" and resolved["async_scheduling"] is False and resolved["num_kv_blocks"] > 1
    assert m.extra["environment"]["torch"] and "gpu_count" in m.extra["environment"]
    assert m.parent.digest == load_artifact(tiny_checkpoint).digest
    assert (out / "latency.png").stat().st_size > 1000


def test_latency_and_compare(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    for name, batch in (("b1", "1"), ("b2", "2")):
        args = ["bench", "latency", str(tiny_checkpoint), "--batch-size", batch, "--num-requests", "4"]
        code, _, err = invoke(capsys, *args, "--output-len", "6", "--device", "cpu", "-o", str(tmp_path / name))
        assert code == 0, err
    code, stdout, _ = invoke(capsys, "bench", "compare", str(tmp_path / "b1"), str(tmp_path / "b2"))
    assert code == 0 and "b1:kiln" in stdout and "b2:kiln" in stdout and "x)" in stdout


def test_mangled_report_is_rejected(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    code, _, err = invoke(capsys, "bench", "throughput", str(tiny_checkpoint), *SMALL, "-o", str(out))
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())
    data["runs"]["kiln"]["output_token_throughput"] *= 10
    (out / "results.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="results.json"):
        validate_report(out)
    code, _, err = invoke(capsys, "bench", "compare", str(out))
    assert code == 2 and "results.json" in err


def test_dummy_weights_from_a_config(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "config.json"
    shutil.copyfile(tiny_checkpoint / "config.json", config)
    code, stdout, err = invoke(capsys, "bench", "throughput", str(config), "--dummy-weights", *SMALL, "--json")
    assert code == 0, err
    assert json.loads(stdout)["runs"]["kiln"]["output_tokens"] == 30
    code, _, err = invoke(capsys, "bench", "throughput", "x", "--dummy-weights", "--preset", "llama-9", *SMALL)
    assert code == 2 and "unknown preset 'llama-9'" in err
    for quantization in ("fp8", "int4-awq"):  # random weights in the quantized layouts, through their kernels' paths
        args = ["bench", "latency", str(config), "--dummy-weights", "--dummy-quantization", quantization]
        code, stdout, err = invoke(
            capsys, *args, "--num-requests", "2", "--output-len", "4", "--device", "cpu", "--json"
        )
        assert code == 0, err
        assert json.loads(stdout)["runs"]["kiln"]["output_tokens"] == 8


def test_bench_serve_against_kiln_serve(serve_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from live_server import API_KEY, start_server, stop_server

    live = start_server(serve_checkpoint)
    try:
        out = tmp_path / "report"
        args = ["bench", "serve", "--url", live.url, "--concurrency", "1,4", "--num-requests", "8", "--input-len", "10"]
        code, _, err = invoke(capsys, *args, "--output-len", "6", "--vocab-size", "320", "--api-key", API_KEY,
                              "--slo-ttft-ms", "10000", "--slo-tpot-ms", "10000", "-o", str(out))  # fmt: skip
        served = live.get("/metrics").body.decode()
    finally:
        stop_server(live)
    assert code == 0, err
    # One unmeasured warm-up request (--warmup 1, the default), then 8 at each concurrency.
    completions = [line for line in served.splitlines() if line.startswith("kiln_requests_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in completions if "completions" in line) == 17
    runs = validate_report(out)["runs"]
    assert set(runs) == {"1", "4"}
    for run in runs.values():
        assert run["completed"] == 8 and run["failed"] == 0 and run["output_tokens"] == 48
        assert run["goodput"] == pytest.approx(run["request_throughput"])  # generous SLOs: every request is good
        assert run["ttft_ms"]["p99"] >= run["ttft_ms"]["p50"] > 0 and run["itl_ms"]["count"] == 8 * 5
        server = run["server"]  # the server's own means over this run, from its /metrics
        assert server["requests"] == 8 and 0 < server["ttft_ms"] <= run["ttft_ms"]["mean"]
        assert server["ttft_ms"] == pytest.approx(server["queue_ms"] + server["prefill_ms"])
    assert (out / "throughput_vs_concurrency.png").is_file()
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert [(r["run"], r["index"]) for r in records] == [(run, i) for run in ("1", "4") for i in range(8)]
    for record in records:  # each request's own numbers: they make up the run's distribution above
        assert record["success"] and record["output_tokens"] == 6 and record["prompt_tokens"] == 10
        assert 0 < record["ttft_ms"] <= record["e2e_ms"] and record["max_itl_ms"] > 0 and record["tpot_ms"] > 0
        assert 0 < record["response_ms"] <= record["ttft_ms"]
    one_at_a_time = [r for r in records if r["run"] == "1"]
    assert (
        one_at_a_time[0]["start_s"] == 0
        and all(  # concurrency 1: each request waits for the one before
            later["start_s"] * 1000 >= earlier["start_s"] * 1000 + earlier["e2e_ms"] - 1
            for earlier, later in zip(one_at_a_time, one_at_a_time[1:])
        )
    )


@pytest.mark.parametrize("client", ["http", "openai"])
def test_bench_serve_counts_the_tokens_of_a_model_without_tokenizer(
    tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch, client: str
) -> None:
    # Random weights from a config alone, as the GPU benchmarks serve them: no tokenizer, so every streamed
    # text is empty; the chunks carry their token ids (return_token_ids) and each token counts. Both clients.
    from live_server import API_KEY, start_server, stop_server

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))  # the server process inherits it
    config = tmp_path / "config.json"
    shutil.copyfile(tiny_checkpoint / "config.json", config)
    live = start_server(config, "--dummy-weights")
    try:
        args = ["bench", "serve", "--url", live.url, "--concurrency", "2", "--num-requests", "4", "--input-len", "8"]
        code, stdout, err = invoke(capsys, *args, "--output-len", "5", "--vocab-size", "320", "--api-key", API_KEY,
                                   "--json", "--client", client)  # fmt: skip
    finally:
        stop_server(live)
    assert code == 0, err
    run = json.loads(stdout)["runs"]["2"]
    assert run["completed"] == 4 and run["output_tokens"] == 20 and run["itl_ms"]["count"] == 4 * 4


def test_jsonl_and_sharegpt_workloads(tmp_path: Path) -> None:
    from tiny_models import make_tiny_tokenizer

    from kiln.bench.workload import from_jsonl, from_sharegpt
    from kiln.core.errors import UserInputError

    tokenizer = make_tiny_tokenizer(320)
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "The capital of France is"}\n{"prompt_token_ids": [5, 6, 7], "output_len": 3}\n')
    workload = from_jsonl(jsonl, tokenizer, output_len=9)
    assert [r.output_len for r in workload.requests] == [9, 3]
    assert workload.requests[0].prompt_token_ids == tuple(tokenizer("The capital of France is").input_ids)
    jsonl.write_text('{"text": 1}\n')
    with pytest.raises(UserInputError, match="prompt_token_ids"):
        from_jsonl(jsonl, tokenizer, output_len=9)
    share = tmp_path / "sharegpt.json"
    turns = [{"conversations": [{"from": "human", "value": f"Tell me about kilns, part {i}, please."},
                                {"from": "gpt", "value": "A kiln is an oven that fires pottery and bricks."}]}
             for i in range(5)]  # fmt: skip
    share.write_text(json.dumps(turns))
    workload = from_sharegpt(share, tokenizer, num_requests=3, seed=1)
    reply_len = len(tokenizer("A kiln is an oven that fires pottery and bricks.").input_ids)
    assert len(workload.requests) == 3 and all(r.output_len == reply_len for r in workload.requests)
    assert from_sharegpt(share, tokenizer, num_requests=3, seed=1).digest == workload.digest
    share.write_text("[]")
    with pytest.raises(UserInputError, match="no ShareGPT conversations"):
        from_sharegpt(share, tokenizer, num_requests=3)
