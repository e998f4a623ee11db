"""Benchmark reports: an artifact (kind bench-report) that someone else can reproduce from, and compare.

A report directory holds results.json and results.yaml (the same data), requests.jsonl (one line per
measured request: run, when it was sent, TTFT, TPOT, longest gap between tokens), latency plots (PNG) and a
manifest whose spec is the full resolved command and whose extra records the environment (GPU name
and count, driver, CUDA, torch, triton, kiln), the model's manifest digest, the seed and the
workload's digest. `validate_report` refuses a report whose files do not match its manifest or
whose results are incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.bench.metrics import BenchSummary, RequestTrace
from kiln.core.artifact import Artifact, ArtifactWriter, is_artifact, load_artifact, parent_ref_for
from kiln.core.errors import ArtifactError
from kiln.core.fingerprint import library_versions

RESULT_KEYS = ("duration_s", "completed", "failed", "output_token_throughput", "request_throughput")


def environment() -> dict[str, Any]:
    """Where the numbers come from."""
    env: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), **library_versions()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_count"] = torch.cuda.device_count()
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env.update(gpu=None, gpu_count=0, driver=None, cpu=platform.processor() or platform.machine())
    return env


def write_report(
    out_dir: Path, *, kind: str, command: list[str], options: dict[str, Any], model_dir: Path | None,
    workload_digest: str, summaries: dict[str, BenchSummary], traces: dict[str, list[RequestTrace]],
    force: bool = False,
) -> Artifact:  # fmt: skip
    """Write the report artifact; `summaries` maps a run name (backend, or concurrency) to its summary."""
    results = {"kind": kind, "runs": {name: dataclasses.asdict(s) for name, s in summaries.items()}}
    with ArtifactWriter(out_dir, kind="bench-report", force=force) as writer:
        (writer.path / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        (writer.path / "results.yaml").write_text(yaml.safe_dump(results, sort_keys=False), encoding="utf-8")
        _write_requests(writer.path / "requests.jsonl", traces)
        _plot(writer.path, summaries, traces)
        model = {}
        parent = None
        if model_dir is not None and (model_dir / "config.json").is_file():
            parent = parent_ref_for(model_dir) if is_artifact(model_dir) or _has_weights(model_dir) else None
            model = {"dir": str(model_dir)}
        writer.commit(
            name=f"bench-{kind}",
            parent=parent,
            spec={"command": command, "options": options},
            model=model,
            extra={"environment": environment(), "workload_digest": workload_digest, "seed": options.get("seed")},
        )
    return load_artifact(out_dir, kind="bench-report")


def _write_requests(path: Path, traces: dict[str, list[RequestTrace]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for name, run in traces.items():
            run_start = min((trace.start for trace in run), default=0.0)
            for index, trace in enumerate(run):
                out.write(json.dumps({"run": name, "index": index, **trace.record(run_start)}) + "\n")


def _has_weights(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors"))


def _plot(out: Path, summaries: dict[str, BenchSummary], traces: dict[str, list[RequestTrace]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in traces.items():
        ok = [t for t in run if t.success]
        axes[0].hist([t.e2e * 1000 for t in ok], bins=30, alpha=0.6, label=name)
        axes[1].hist([t.ttft * 1000 for t in ok if t.ttft is not None], bins=30, alpha=0.6, label=name)
    for ax, title in zip(axes, ("end-to-end latency (ms)", "time to first token (ms)")):
        ax.set_title(title)
        ax.set_ylabel("requests")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100)
    plt.close(fig)
    if len(summaries) > 1 and all(name.isdigit() for name in summaries):  # a concurrency sweep
        fig, ax = plt.subplots(figsize=(5, 4))
        levels = sorted(summaries, key=int)
        ax.plot([int(c) for c in levels], [summaries[c].output_token_throughput for c in levels], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tokens / s")
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_concurrency.png", dpi=100)
        plt.close(fig)


def validate_report(path: Path) -> dict[str, Any]:
    """The results of a report whose files match its manifest and whose runs carry every result field."""
    artifact = load_artifact(path, kind="bench-report", verify=True)
    try:
        results = json.loads((path / "results.json").read_text(encoding="utf-8"))
        mirror = yaml.safe_load((path / "results.yaml").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ArtifactError(f"{path}: unreadable results ({exc})") from exc
    if results != mirror:
        raise ArtifactError(f"{path}: results.json and results.yaml disagree")
    runs = results.get("runs") if isinstance(results, dict) else None
    if not runs or not all(isinstance(r, dict) and all(k in r for k in RESULT_KEYS) for r in runs.values()):
        raise ArtifactError(f"{path}: results lack runs or the fields {', '.join(RESULT_KEYS)}")
    if "environment" not in artifact.manifest.extra or "workload_digest" not in artifact.manifest.extra:
        raise ArtifactError(f"{path}: the manifest lacks the environment or the workload digest")
    return results
