"""The `kiln` command as a user meets it: console script, inspect tables, run, errors without tracebacks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cli_runner import invoke

KILN = [sys.executable, "-m", "kiln.cli.main"]


def test_console_script_convert_json(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # A real process, as CI pipelines call it: JSON alone on stdout, exit code 0.
    result = subprocess.run(
        [*KILN, "convert", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(tmp_path / "out")
    assert report["manifest"]["kind"] == "checkpoint" and report["manifest_digest"].startswith("sha256:")


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([*KILN, "inspect", str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "error:" in result.stderr and "not a kiln artifact" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_inspect_table(tiny_checkpoint: Path, capsys) -> None:
    code, out, _ = invoke(capsys, "inspect", str(tiny_checkpoint), "--verify")
    assert code == 0
    for text in ("checkpoint artifact", "LlamaForCausalLM", "model.safetensors", "sha256 checked", "ok"):
        assert text in out


def test_inspect_json_and_tamper_detection(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    damaged = Path(shutil.copytree(tiny_checkpoint, tmp_path / "damaged"))
    code, out, _ = invoke(capsys, "inspect", str(damaged), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["manifest"]["model"]["dtype"] == "bf16"

    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (damaged / "model.safetensors").write_bytes(bytes(data))
    code, _, _ = invoke(capsys, "inspect", str(damaged))
    assert code == 0  # sizes match; only --verify reads content
    code, out, err = invoke(capsys, "inspect", str(damaged), "--verify")
    assert code == 2 and "model.safetensors does not match its sha256" in err
    assert "MODIFIED" in out  # the files table marks the row too
    code, out, _ = invoke(capsys, "inspect", str(damaged), "--verify", "--json")
    report = json.loads(out)
    assert (
        code == 2
        and not report["ok"]
        and report["problems"] == ["model.safetensors does not match its sha256 (modified after it was written)"]
    )

    (damaged / "tokenizer.json").unlink()
    code, _, err = invoke(capsys, "inspect", str(damaged))
    assert code == 2 and "tokenizer.json is missing" in err


def test_run_json(tiny_checkpoint: Path, capsys) -> None:
    code, out, _ = invoke(
        capsys,
        "run",
        str(tiny_checkpoint),
        "-p",
        "The capital",
        "-p",
        "A quick",
        "--max-tokens",
        "5",
        "--json",
        "--no-chat",
    )
    assert code == 0
    results = json.loads(out)["results"]
    assert [r["prompt"] for r in results] == ["The capital", "A quick"]
    assert all(1 <= len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length") for r in results)


def test_run_greedy_is_deterministic_and_seeded_sampling_reproducible(tiny_checkpoint: Path, capsys) -> None:
    def tokens(*flags: str) -> list[int]:
        code, out, _ = invoke(
            capsys, "run", str(tiny_checkpoint), "-p", "The capital", "--max-tokens", "8", "--json", *flags
        )
        assert code == 0
        return json.loads(out)["results"][0]["token_ids"]

    assert tokens() == tokens()
    assert tokens("--temperature", "1.0", "--seed", "7") == tokens("--temperature", "1.0", "--seed", "7")


def test_run_refuses_bad_input(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    code, _, err = invoke(capsys, "run", str(tmp_path / "missing"), "-p", "x")
    assert code == 2 and "is not a directory" in err
    code, _, err = invoke(capsys, "run", str(tiny_checkpoint), "-p", "x", "--max-tokens", "0")
    assert code == 2 and "SamplingParams.max_tokens must be an integer >= 1, got 0" in err
    code, _, err = invoke(capsys, "run", str(tiny_checkpoint), "-p", "x", "--max-tokens", "1000")
    assert code == 2 and "exceeds max_seq_len=256" in err


def test_run_on_the_builtin_checkpoint_answers_paris(builtin_checkpoint: Path, capsys) -> None:
    code, out, _ = invoke(
        capsys, "run", str(builtin_checkpoint), "-p", "What is the capital of France?", "--max-tokens", "24", "--json"
    )
    assert code == 0
    assert "Paris" in json.loads(out)["results"][0]["text"]


def test_convert_options_from_a_config_file(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "convert.yaml"
    config.write_text("dtype: fp16\nname: from-file\nmax-shard-size: 100KB\n")
    code, out, _ = invoke(
        capsys, "convert", str(tiny_llama_dir), "-o", str(tmp_path / "a"), "--config", str(config), "--json"
    )
    spec = json.loads(out)["manifest"]["spec"]
    assert code == 0 and spec["dtype"] == "fp16" and spec["name"] == "from-file" and spec["max_shard_bytes"] == 100_000
    code, out, _ = invoke(
        capsys,
        "convert",
        str(tiny_llama_dir),
        "-o",
        str(tmp_path / "b"),
        "--config",
        str(config),
        "--dtype",
        "fp32",
        "--json",
    )
    assert code == 0 and json.loads(out)["manifest"]["spec"]["dtype"] == "fp32"  # the flag wins over the file
    config.write_text("dtype: fp16\ncolour: blue\n")
    code, _, err = invoke(capsys, "convert", str(tiny_llama_dir), "-o", str(tmp_path / "c"), "--config", str(config))
    assert code == 2 and "unknown option(s) colour" in err and not (tmp_path / "c").exists()


def test_run_builtin_uses_the_cached_checkpoint(builtin_checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    cached = tmp_path / "checkpoints" / "smollm2-135m"
    shutil.copytree(builtin_checkpoint, cached)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    code, out, _ = invoke(capsys, "run", "builtin:smollm2-135m", "-p", "What is the capital of France?", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["model_dir"] == str(cached) and "Paris" in report["results"][0]["text"]


def test_run_prompts_file_and_output_jsonl(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "The capital"})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    code, _, err = invoke(
        capsys, "run", str(tiny_checkpoint), "--prompts-file", str(prompts), "-o", str(out), "--max-tokens", "4"
    )
    assert code == 0 and "2 request(s)" in err and "tok/s" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["The capital", [{"role": "user", "content": "hi"}]]
    assert all(1 <= len(r["token_ids"]) <= 4 for r in records)

    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first prompt\n\nsecond prompt\n")
    code, out_text, _ = invoke(capsys, "run", str(tiny_checkpoint), "--prompts-file", str(text_file), "--json")
    assert code == 0 and [r["prompt"] for r in json.loads(out_text)["results"]] == ["first prompt", "second prompt"]

    prompts.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    code, _, err = invoke(capsys, "run", str(tiny_checkpoint), "--prompts-file", str(prompts))
    assert code == 2 and "prompts.jsonl:2: each line needs" in err
    code, _, err = invoke(capsys, "run", str(tiny_checkpoint))
    assert code == 2 and "no prompts" in err
