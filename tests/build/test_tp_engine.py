"""`kiln build --tp-size 2`: one weight file per rank, each rank's exact shard, loaded alone, run only with 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import invoke
from safetensors import safe_open

import kiln.models.engine_weights as engine_weights
from kiln import LLM, SamplingParams
from kiln.cli.main import main
from kiln.core.artifact import load_artifact
from kiln.core.errors import UserInputError
from kiln.core.hashing import sha256_file
from kiln.models.loader import load_model
from kiln.models.parallel import set_tensor_parallel

PROMPTS = [[1, 5, 9, 77, 3, 250, 6], [1, 200, 31], list(range(40, 71))]
BUILD_ARGS = ("--tp-size", "2", "--target-gpu", "cpu", "--max-seq-len", "96")
# The tiny Llama (4 heads, 2 KV heads of 16, hidden 64, intermediate 128, vocabulary 320) per rank of 2.
RANK_SHAPES = {
    "model.embed_tokens.weight": (160, 64),
    "lm_head.weight": (160, 64),
    "model.layers.0.self_attn.qkv_proj.weight": (64, 64),  # (2 q heads + 1 k head + 1 v head) x 16 of 128 rows
    "model.layers.0.self_attn.o_proj.weight": (64, 32),
    "model.layers.0.mlp.gate_up_proj.weight": (128, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 64),
    "model.layers.0.input_layernorm.weight": (64,),
}


@pytest.fixture(scope="module")
def tp_engine(serve_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 tiny Llama built for two ranks on the CPU."""
    out = tmp_path_factory.mktemp("tp-engine") / "engine"
    assert main(["build", str(serve_checkpoint), "-o", str(out), *BUILD_ARGS]) == 0
    return out


def test_two_rank_files_of_halved_shapes_byte_identical(tp_engine: Path, tmp_path: Path, capsys) -> None:
    again = tmp_path / "again"
    code, _, err = invoke(capsys, "build", str(load_artifact(tp_engine).manifest.spec["source"]), "-o", str(again),
                          *BUILD_ARGS)  # fmt: skip
    assert code == 0, err
    names = ["rank0.safetensors", "rank1.safetensors"]
    assert sorted(p.name for p in tp_engine.glob("*.safetensors")) == names
    for name in names:
        assert sha256_file(tp_engine / name) == sha256_file(again / name)
        with safe_open(tp_engine / name, framework="pt") as weights:
            assert weights.metadata() == {"format": engine_weights.ENGINE_FORMAT}
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in RANK_SHAPES}
        assert shapes == RANK_SHAPES
    manifest = load_artifact(tp_engine, kind="engine", verify=True).manifest
    assert {entry.path: entry.sha256 for entry in manifest.files if entry.path in names} == {
        name: sha256_file(tp_engine / name) for name in names
    }
    assert manifest.extra["engine_options"]["tp_size"] == 2 and manifest.spec["resolved"]["tp_size"] == 2


def test_each_rank_opens_only_its_file_and_holds_its_checkpoint_shard(
    tp_engine: Path, serve_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []

    def spying_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(engine_weights, "safe_open", spying_open)
    try:
        for rank in (0, 1):
            set_tensor_parallel(rank, 2)  # no process group: loading reads only the rank and the size
            opened.clear()
            from_engine, _ = load_model(tp_engine, dtype=torch.float32)
            assert opened == [f"rank{rank}.safetensors"]
            from_checkpoint, _ = load_model(serve_checkpoint, dtype=torch.float32)
            expected = dict(from_checkpoint.named_parameters())
            got = dict(from_engine.named_parameters())
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[name], expected[name]) for name in expected), rank
    finally:
        set_tensor_parallel(0, 1)
    with pytest.raises(UserInputError, match="built for tp_size=2 .* run it with --tp-size 2"):
        load_model(tp_engine, dtype=torch.float32)  # one rank would take rank 0's shard for the whole model


def test_two_rank_engine_generates_the_checkpoint_tokens(tp_engine: Path, serve_checkpoint: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = LLM(str(serve_checkpoint), device="cpu", num_kv_blocks=64).generate(PROMPTS, params)
    llm = LLM(str(tp_engine))  # the engine's tp_size is the default: two ranks
    try:
        assert llm.engine.config.tp_size == 2
        assert llm.engine.limits.max_seq_len == 96  # the engine's other options are still the defaults
        got = llm.generate(PROMPTS, params)
    finally:
        llm.engine.shutdown()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_another_tp_size_is_refused_before_any_worker_starts(
    tp_engine: Path, serve_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    for asked in ("1", "4"):
        code, _, err = invoke(capsys, "run", str(tp_engine), "--prompt", "hi", "--tp-size", asked)
        assert code == 2 and "Traceback" not in err
        assert f"built for tp_size=2 (one weight file per rank) but tp_size={asked} was asked" in err
        assert "run it with --tp-size 2" in err
    one_rank = tmp_path / "one-rank"
    assert main(["build", str(serve_checkpoint), "-o", str(one_rank), "--target-gpu", "cpu"]) == 0
    code, _, err = invoke(capsys, "run", str(one_rank), "--prompt", "hi", "--tp-size", "2")
    assert code == 2 and "built for tp_size=1" in err and "run it with --tp-size 1" in err
