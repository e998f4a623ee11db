"""`kiln build`: engines that are deterministic, run like their checkpoint, and refuse the wrong machine."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from cli_runner import invoke

from kiln import LLM, SamplingParams
from kiln.core.artifact import load_artifact
from kiln.core.hashing import sha256_file

PROMPTS = [[1, 5, 9, 77, 3], [1, 200, 31, 4, 4, 8], [1] + list(range(40, 70))]


def build(capsys, checkpoint: Path, out: Path, *args: str) -> None:
    code, _, err = invoke(capsys, "build", str(checkpoint), "-o", str(out), *args)
    assert code == 0, err


def test_builds_for_a_gpu_on_this_cpu_are_byte_identical(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):
        build(capsys, tiny_checkpoint, tmp_path / name, "--target-gpu", "h100-80gb", "--max-seq-len", "128")
    digests = [sha256_file(tmp_path / name / "rank0.safetensors") for name in ("a", "b")]
    assert digests[0] == digests[1]
    manifest = load_artifact(tmp_path / "a", kind="engine", verify=True).manifest
    assert manifest.parent.digest == load_artifact(tiny_checkpoint).digest
    assert manifest.extra["fingerprint"]["target"]["arch"] == "sm90"
    assert set(manifest.extra["fingerprint"]["versions"]) == {"torch", "triton", "cuda", "kiln"}
    assert manifest.extra["plan"]["num_kv_blocks"] > 1 and manifest.extra["plan"]["weight_bytes"] > 0
    assert manifest.spec["resolved"]["max_seq_len"] == 128 and manifest.spec["resolved"]["max_batch_size"] == 256
    assert "kernel_cache" not in manifest.extra  # no GPU here to compile kernels on


def test_engine_generates_what_its_checkpoint_generates(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    build(capsys, tiny_checkpoint, tmp_path / "engine", "--target-gpu", "cpu", "--max-seq-len", "96")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    from_checkpoint = LLM(str(tiny_checkpoint), num_kv_blocks=64).generate(PROMPTS, params)
    engine = LLM(str(tmp_path / "engine"))
    assert engine.engine.limits.max_seq_len == 96  # the engine's planned limits are the defaults
    from_engine = engine.generate(PROMPTS, params)
    assert [r.token_ids for r in from_engine] == [r.token_ids for r in from_checkpoint]
    code, _, err = invoke(capsys, "run", str(tmp_path / "engine"), "--prompt", "hi", "--max-seq-len", "500")
    assert code == 2 and "exceeds the 96 this engine was built for" in err


def test_gpu_engine_is_refused_here_with_one_sentence(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    build(capsys, tiny_checkpoint, tmp_path / "engine", "--target-gpu", "h100-80gb", "--max-seq-len", "128")
    code, _, err = invoke(capsys, "run", str(tmp_path / "engine"), "--prompt", "hello", "--device", "cpu")
    assert code == 2
    assert "was built for h100-80gb (sm90) and cannot run on the CPU" in err and "Traceback" not in err


def test_tampered_weights_are_detected(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    engine = tmp_path / "engine"
    build(capsys, tiny_checkpoint, engine, "--target-gpu", "cpu", "--max-seq-len", "64")
    weights = engine / "rank0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern inside a tensor: same size, other content
    weights.write_bytes(bytes(data))
    code, out, err = invoke(capsys, "inspect", str(engine), "--verify")
    assert code != 0 and "rank0.safetensors" in out + err
    weights.write_bytes(bytes(data[:-1000]))  # truncated: caught on load without hashing
    code, _, err = invoke(capsys, "run", str(engine), "--prompt", "hi")
    assert code == 2 and "rank0.safetensors" in err and "damaged" in err


def test_config_file_then_flags_and_dry_run(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "build.yaml"
    config.write_text(
        yaml.safe_dump({"max-batch-size": 8, "max_seq_len": 128, "kv_block_size": 32, "target_gpu": "cpu"})
    )
    out = tmp_path / "engine"
    build(capsys, tiny_checkpoint, out, "--config", str(config), "--max-seq-len", "64")
    resolved = load_artifact(out).manifest.spec["resolved"]
    assert (resolved["max_batch_size"], resolved["max_seq_len"], resolved["block_size"]) == (8, 64, 32)
    code, stdout, err = invoke(capsys, "build", str(tiny_checkpoint), "--config", str(config), "--dry-run", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["plan"]["kv_bytes_per_token"] > 0 and report["options"]["max_seq_len"] == 128
    code, stdout, _ = invoke(capsys, "build", str(tiny_checkpoint), "--target-gpu", "h200", "--dry-run")
    assert code == 0 and "KV blocks of 16 tokens" in stdout and "max concurrency" in stdout


def test_refusals_exit_2_and_write_nothing(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "engine"
    cases = [
        (["--max-seq-len", "100000"], "exceeds the model's context"),
        (["--target-gpu", "h300"], "unknown --target-gpu 'h300'"),
        (["--kv-cache-dtype", "fp8", "--target-gpu", "a100-80gb"], "lacks"),
        (["--tp-size", "3", "--target-gpu", "cpu"], "does not split the model's 4 attention heads and 2 KV heads"),
        (["--cuda-graph-batch-sizes", "1,x"], "takes integers"),
    ]
    for args, message in cases:
        code, _, err = invoke(capsys, "build", str(tiny_checkpoint), "-o", str(out), *args)
        assert code == 2 and message in err, (args, err)
        assert not out.exists()


def test_dummy_weight_engine_from_a_config(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "engine"
    code, _, err = invoke(capsys, "build", str(tiny_checkpoint / "config.json"), "--dummy-weights", "-o", str(out),
                          "--target-gpu", "cpu", "--max-seq-len", "64")  # fmt: skip
    assert code == 0, err
    manifest = load_artifact(out, verify=True).manifest
    assert manifest.spec["dummy_weights"] is True and manifest.parent is None
    # The config's directory has a tokenizer: the engine keeps it and takes text (start-time measurements).
    (result,) = LLM(str(out)).generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(result.token_ids) == 3
