"""`kiln quantize`: calibrate with ModelOpt, export its unified HF checkpoint, measure, gate, publish.

The artifact is written to a temporary directory; the quality evaluation against the parent runs on
it there, and only a result within the gate is renamed into place (exit code 3 otherwise, nothing left).
"""

import contextlib
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.core.artifact import Artifact, ArtifactWriter, check_output_dir, is_artifact, load_artifact, parent_ref_for
from kiln.core.errors import QualityGateError, UserInputError
from kiln.quantize.datasets import load_text, token_windows
from kiln.quantize.evaluate import EvalReport, evaluate
from kiln.quantize.formats import get_format

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeSpec:
    """Resolved options of one quantization; stored in the manifest as `spec`."""

    source: Path
    output: Path
    format: str
    calib_data: str = "builtin"
    calib_size: int = 32  # calibration windows
    calib_seq_len: int = 256
    group_size: int = 128
    awq_clip: bool = False  # int4-awq: add AWQ's clipping search (better, much slower on a CPU)
    kv_cache_dtype: str | None = None
    seed: int = 0
    max_ppl_increase: float | None = None  # percent; None = the format's default gate
    eval_data: str = "builtin"
    eval_seq_len: int = 512
    eval_windows: int = 8
    device: str = "cpu"
    force: bool = False


def quantize(spec: QuantizeSpec) -> Artifact:
    """Quantize spec.source into a gated checkpoint artifact at spec.output."""
    from transformers import AutoTokenizer

    from kiln.quantize.modelopt_quantize import quantize_checkpoint  # imports modelopt: only when used

    fmt = get_format(spec.format)
    gate = fmt.max_ppl_increase_pct if spec.max_ppl_increase is None else spec.max_ppl_increase
    if gate < 0:
        raise UserInputError(f"--max-ppl-increase must be >= 0 percent, got {gate}")
    if spec.awq_clip and spec.format != "int4-awq":
        raise UserInputError(f"--awq-clip refines AWQ's int4 scales; it does not apply to --format {spec.format}")
    check_output_dir(spec.output, spec.force)
    source_dir = Path(spec.source)
    if not (source_dir / "config.json").is_file():
        raise UserInputError(f"{source_dir} is not a model directory; quantize a checkpoint from `kiln convert`")
    calibration = load_text(spec.calib_data, builtin="calibration")
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    windows = token_windows(tokenizer, calibration.text, spec.calib_seq_len, spec.calib_size)
    with ArtifactWriter(spec.output, kind="checkpoint", force=spec.force) as writer:
        with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout stays for --json
            result = quantize_checkpoint(
                source_dir,
                writer.path,
                spec.format,
                windows,
                spec.group_size,
                spec.kv_cache_dtype,
                spec.device,
                spec.seed,
                spec.awq_clip,
            )
        report = evaluate(
            writer.path, spec.eval_data, compare_dir=source_dir, seq_len=spec.eval_seq_len,
            max_windows=spec.eval_windows, device=spec.device,
        )  # fmt: skip
        quality = _quality(report, gate)
        if quality["ppl_increase_pct"] > gate:
            raise QualityGateError(
                f"quality gate failed: perplexity rose {quality['ppl_increase_pct']:.2f}% "
                f"({quality['ppl_parent']:.3f} -> {quality['ppl']:.3f}), above --max-ppl-increase {gate}%; "
                f"KL {quality['kl']:.4f}, top-1 agreement {quality['top1_agreement']:.3f}. Nothing was written"
            )
        parent_model = _parent_model_summary(source_dir)
        writer.commit(
            name=f"{parent_model.get('name') or source_dir.name}-{spec.format}",
            parent=parent_ref_for(source_dir),
            spec={"stage": "quantize", **_plain(asdict(spec)), "max_ppl_increase": gate},
            model={**parent_model.get("model", {}), "quantization": spec.format, "kv_cache_dtype": spec.kv_cache_dtype},
            extra={
                "calibration": {
                    "data": calibration.source,
                    "data_digest": calibration.digest,
                    "samples": len(windows) if result.num_calib_windows else 0,
                    "seq_len": spec.calib_seq_len,
                    "seed": spec.seed,
                },
                "quality": quality,
                "group_sizes": result.group_sizes,
            },
        )
    return load_artifact(spec.output, kind="checkpoint")


def _quality(report: EvalReport, gate: float) -> dict[str, Any]:
    increase = (report.ppl / report.ppl_other - 1.0) * 100.0
    return {
        "ppl_parent": round(report.ppl_other, 4),
        "ppl": round(report.ppl, 4),
        "ppl_increase_pct": round(increase, 3),
        "kl": round(report.kl, 6),
        "top1_agreement": round(report.top1_agreement, 4),
        "data_digest": report.data_digest,
        "num_tokens": report.num_tokens,
        "gate_max_ppl_increase_pct": gate,
    }


def _parent_model_summary(source_dir: Path) -> dict[str, Any]:
    if not is_artifact(source_dir):
        return {}
    manifest = load_artifact(source_dir).manifest
    return {"name": manifest.name, "model": dict(manifest.model)}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}
