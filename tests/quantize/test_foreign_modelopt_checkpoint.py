"""A ModelOpt checkpoint made without kiln (modelopt called directly, as other pipelines do) loads and runs."""

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.kernels.attention import AttentionMetadata
from kiln.models.loader import load_model

# A declared dependency (installed by `make test`); machines without it (the GPU image) skip these tests.
pytest.importorskip("modelopt")


@pytest.mark.parametrize("config_name", ["FP8_DEFAULT_CFG", "INT4_AWQ_CFG"])
def test_checkpoint_exported_directly_with_modelopt(tiny_llama_dir: Path, tmp_path: Path, config_name: str) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    config = copy.deepcopy(getattr(mtq, config_name))
    if config_name == "INT4_AWQ_CFG":  # the tiny model's 64-wide inputs need groups of 64
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"] = {-1: 64, "type": "static"}
    calibration = torch.randint(0, 320, (4, 32))

    def forward_loop(m: torch.nn.Module) -> None:
        for row in calibration:
            m(row[None])

    with torch.no_grad():
        mtq.quantize(model, config, forward_loop)
        export_hf_checkpoint(model, export_dir=tmp_path / "foreign")
    out = tmp_path / "foreign"
    assert (out / "hf_quant_config.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tiny_llama_dir / name).read_bytes())

    ours, _ = load_model(out, dtype=torch.float32)
    ids = torch.tensor([5, 17, 42, 99, 3])
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, torch.arange(5), AttentionMetadata.for_prefill([5], "cpu")))
    assert torch.isfinite(logits).all()
    (result,) = LLM(str(out), num_kv_blocks=64).generate("The capital", SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(result.token_ids) == 6
