"""`kiln build --pp-size 2`: the plan of the tightest stage, an engine that runs in two stages by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import invoke

from kiln import LLM, SamplingParams
from kiln.cli.main import main
from kiln.core.artifact import load_artifact
from kiln.runtime.pipeline_workers import StageGroup

PROMPTS = [[1, 5, 9, 77, 3, 250, 6], [1, 200, 31], list(range(40, 71))]
BUILD_ARGS = ("--pp-size", "2", "--target-gpu", "cpu", "--max-seq-len", "96")


@pytest.fixture(scope="module")
def pp_engine(serve_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pp-engine") / "engine"
    assert main(["build", str(serve_checkpoint), "-o", str(out), *BUILD_ARGS]) == 0
    return out


def test_the_engine_records_its_stages_and_runs_with_them_by_default(pp_engine: Path, serve_checkpoint: Path) -> None:
    manifest = load_artifact(pp_engine, kind="engine", verify=True).manifest
    assert manifest.extra["engine_options"]["pp_size"] == 2 and manifest.spec["resolved"]["pp_size"] == 2
    assert manifest.extra["plan"]["stage"] == 0  # the tiny Llama's 2 layers: one each; stage 0 holds the embedding
    assert sorted(p.name for p in pp_engine.glob("*.safetensors")) == ["rank0.safetensors"]  # stages share it
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64).generate(PROMPTS, params)
    llm = LLM(str(pp_engine))
    try:
        assert isinstance(llm.engine.workers, StageGroup) and llm.engine.config.pp_size == 2
        got = llm.generate(PROMPTS, params)
    finally:
        llm.engine.shutdown()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    single = LLM(str(pp_engine), pp_size=1)  # asked for explicitly: one process
    assert single.engine.workers is None
    assert [r.token_ids for r in single.generate(PROMPTS, params)] == [r.token_ids for r in expected]


def test_the_plan_table_names_the_stage_for_cpu_and_gpu_targets(serve_checkpoint: Path, capsys) -> None:
    code, out, _ = invoke(capsys, "build", str(serve_checkpoint), "--dry-run", *BUILD_ARGS)
    assert code == 0 and "stage 0 of 2" in out
    plans = {}
    for pp_size in ("1", "2"):
        gpu = ("--pp-size", pp_size, "--target-gpu", "h100-80gb", "--max-seq-len", "96", "--json")
        code, out, err = invoke(capsys, "build", str(serve_checkpoint), "--dry-run", *gpu)
        assert code == 0, err
        plans[pp_size] = json.loads(out)["plan"]
    # A stage holds one of the two layers: its KV cache per token is half, so more blocks fit.
    assert plans["2"]["num_kv_blocks"] > plans["1"]["num_kv_blocks"] and plans["2"]["stage"] in (0, 1)
    code, _, err = invoke(capsys, "build", str(serve_checkpoint), "--dry-run", "--pp-size", "3", "--target-gpu", "cpu")
    assert code == 2 and "exceeds the model's 2 decoder layers" in err
