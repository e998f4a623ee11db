"""`kiln eval` as a user meets it: a table or JSON on stdout, and user errors as exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import invoke

SMALL = ["--seq-len", "64", "--max-windows", "2", "--device", "cpu"]


def test_json_report(tiny_llama_dir: Path, capsys) -> None:
    code, out, _ = invoke(capsys, "eval", str(tiny_llama_dir), *SMALL, "--json")
    assert code == 0
    report = json.loads(out)  # stdout holds the JSON document and nothing else
    assert report["model_dir"] == str(tiny_llama_dir) and report["data_source"] == "builtin:eval"
    assert report["num_windows"] == 2 and report["seq_len"] == 64 and report["num_tokens"] == 2 * 63
    assert report["ppl"] > 1 and report["data_digest"].startswith("sha256:")
    assert report["compare"] is None and report["kl"] is None and report["top1_agreement"] is None
    assert report["device"] == "cpu" and report["dtype"] == "auto"


def test_json_compare_with_itself(tiny_llama_dir: Path, capsys) -> None:
    code, out, _ = invoke(capsys, "eval", str(tiny_llama_dir), "--compare", str(tiny_llama_dir), *SMALL, "--json")
    report = json.loads(out)
    assert code == 0 and report["kl"] == pytest.approx(0.0, abs=1e-9) and report["top1_agreement"] == 1.0
    assert report["ppl_other"] == report["ppl"] and report["compare_dir"] == str(tiny_llama_dir)


def test_table(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    jsonl = tmp_path / "data.jsonl"
    text = (Path(__file__).parents[2] / "quantize" / "data" / "eval.txt").read_text(encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in text.split("\n\n")[:12]), encoding="utf-8")
    code, out, _ = invoke(
        capsys, "eval", str(tiny_llama_dir), "--data", str(jsonl), "--compare", str(tiny_llama_dir), *SMALL
    )
    assert code == 0
    for expected in ("perplexity", "KL divergence", "top-1 agreement", "100.00%", str(jsonl), "2 x 64 tokens"):
        assert expected in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{tmp}/missing.txt"], "does not exist"),
        (["--data", "{tmp}/short.txt"], "too few for one window of 64"),
        (["--compare", "{tmp}/no-model"], "is not a directory"),
        (["--seq-len", "1000"], "longer than"),
    ],
)
def test_user_errors_exit_2(tiny_llama_dir: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    (tmp_path / "short.txt").write_text("Too short to score.", encoding="utf-8")
    args = [arg.format(tmp=tmp_path) for arg in extra]
    code, out, err = invoke(capsys, "eval", str(tiny_llama_dir), *SMALL, *args)
    assert code == 2 and message in err and out == ""


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", "eval", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "error:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
