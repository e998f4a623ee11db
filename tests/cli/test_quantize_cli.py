"""`kiln quantize`: gated artifacts with calibration provenance and measured quality; the gate's failure path."""

import json
from pathlib import Path

import pytest
from cli_runner import invoke

from kiln import LLM, SamplingParams
from kiln.core.artifact import load_artifact

# A declared dependency (installed by `make test`); machines without it (the GPU image) skip these tests.
pytest.importorskip("modelopt")

SMALL = ["--eval-seq-len", "128", "--eval-windows", "2", "--calib-size", "4", "--calib-seq-len", "64"]


@pytest.mark.parametrize("fmt", ["int4-wo", "fp8"])
def test_quantized_artifact_records_calibration_and_quality(tiny_checkpoint: Path, tmp_path: Path, capsys, fmt) -> None:
    out = tmp_path / fmt
    args = ["quantize", str(tiny_checkpoint), "-o", str(out), "--format", fmt, *SMALL]
    code, stdout, err = invoke(capsys, *args, "--max-ppl-increase", "1000", "--json")
    assert code == 0, err
    manifest = load_artifact(out, kind="checkpoint", verify=True).manifest
    assert json.loads(stdout)["manifest_digest"].startswith("sha256:")
    assert manifest.parent.digest == load_artifact(tiny_checkpoint).digest
    assert manifest.spec["format"] == fmt and manifest.model["quantization"] == fmt
    quality = manifest.extra["quality"]
    assert {"ppl_parent", "ppl", "ppl_increase_pct", "kl", "top1_agreement", "data_digest"} <= quality.keys()
    assert quality["ppl"] > 0 and 0 <= quality["top1_agreement"] <= 1 and quality["kl"] >= 0
    calibration = manifest.extra["calibration"]
    assert calibration["data_digest"].startswith("sha256:") and calibration["seed"] == 0
    assert calibration["samples"] == (0 if fmt == "int4-wo" else 4)  # RTN needs no calibration
    assert (out / "hf_quant_config.json").is_file()
    (result,) = LLM(str(out), num_kv_blocks=64).generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(result.token_ids) == 4


@pytest.mark.slow
def test_builtin_quality_gate_failure_exits_3_and_writes_nothing(
    builtin_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    # The real model: int4 round-to-nearest always costs it some perplexity (a random tiny model may not).
    out = tmp_path / "gated"
    args = ["quantize", str(builtin_checkpoint), "-o", str(out), "--format", "int4-wo", "--eval-windows", "1"]
    code, _, err = invoke(capsys, *args, "--max-ppl-increase", "0")
    assert code == 3
    assert "quality gate failed: perplexity rose" in err and "Nothing was written" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".gated")]


def test_bad_format_is_refused(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    code, _, err = invoke(capsys, "quantize", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--format", "int3")
    assert code == 2 and "unknown quantization format 'int3'" in err
    code, _, err = invoke(
        capsys, "quantize", str(tiny_checkpoint), "-o", str(tmp_path / "y"), "--format", "fp8", "--awq-clip"
    )
    assert code == 2 and "--awq-clip refines AWQ's int4 scales" in err and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_builtin_fp8_passes_its_gate_and_still_knows_paris(builtin_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "smollm2-fp8"
    code, _, err = invoke(
        capsys,
        "quantize",
        str(builtin_checkpoint),
        "-o",
        str(out),
        "--format",
        "fp8",
        "--eval-windows",
        "2",
        "--calib-size",
        "8",
    )
    assert code == 0, err
    quality = load_artifact(out).manifest.extra["quality"]
    assert quality["ppl_increase_pct"] <= 3.0  # the fp8 default gate
    (answer,) = LLM(str(out)).chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=24)
    )
    assert "Paris" in answer.text, answer.text


# SmolLM2 ships as a Q4_1 GGUF (4-bit, blocks of 32): symmetric int4 on top of it needs groups of 16 to stay
# within the 15% gate (docs/quantize.md has the measurements at 16, 32, 64 and 128).
INT4_BUILTIN = {
    "int4-wo": ["--group-size", "16", "--eval-windows", "4"],
    "int4-awq": ["--group-size", "16", "--eval-windows", "4", "--calib-size", "8", "--calib-seq-len", "128"],
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(INT4_BUILTIN))
def test_builtin_int4_passes_its_gate_and_still_knows_paris(
    builtin_checkpoint: Path, tmp_path: Path, capsys, fmt: str
) -> None:
    out = tmp_path / f"smollm2-{fmt}"
    code, _, err = invoke(
        capsys, "quantize", str(builtin_checkpoint), "-o", str(out), "--format", fmt, *INT4_BUILTIN[fmt]
    )
    assert code == 0, err
    manifest = load_artifact(out).manifest
    assert manifest.extra["quality"]["ppl_increase_pct"] <= 15.0  # the int4 default gate
    assert set(manifest.extra["group_sizes"].values()) == {16}
    (answer,) = LLM(str(out)).chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=24)
    )
    assert "Paris" in answer.text, answer.text
