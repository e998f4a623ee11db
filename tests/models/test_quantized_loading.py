"""ModelOpt checkpoints load into our model; logits match the unquantized model on hand-dequantized weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.kernels.attention import AttentionMetadata
from kiln.models.loader import load_model
from kiln.models.quantized_linear import Fp8Linear, Int4Linear, fake_quant_fp8
from kiln.quantize.modelopt_quantize import quantize_checkpoint

NUM_TOKENS = 8


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """Factory: the tiny model quantized to a format by ModelOpt (once per module)."""
    pytest.importorskip("modelopt")  # a declared dependency; the GPU image lacks it
    cache: dict[tuple, Path] = {}
    rng = random.Random(1)
    windows = [[rng.randrange(320) for _ in range(16)] for _ in range(4)]

    def make(fmt: str, kv_cache_dtype: str | None = None) -> Path:
        if (fmt, kv_cache_dtype) not in cache:
            out = tmp_path_factory.mktemp("exported") / fmt
            quantize_checkpoint(tiny_llama_dir, out, fmt, windows, kv_cache_dtype=kv_cache_dtype)
            cache[fmt, kv_cache_dtype] = out
        return cache[fmt, kv_cache_dtype]

    return make


def dequantize_by_hand(path: Path) -> dict[str, torch.Tensor]:
    """fp32 HF state dict from the exported tensors, written independently of models/quantized_linear."""
    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    out = {}
    for name, t in tensors.items():
        if not name.endswith(".weight") or name.replace(".weight", ".weight_scale") not in tensors:
            if not name.endswith(("_scale", "pre_quant_scale")):
                out[name] = t.float()
            continue
        scale = tensors[name.replace(".weight", ".weight_scale")].float()
        if t.dtype == torch.float8_e4m3fn:
            w = t.float() * scale
        else:  # uint8 [out / 2, in]: low nibble row 2r, high nibble row 2r + 1, signed int4
            rows = []
            for r in range(t.shape[0]):
                for nibble in (t[r].int() & 0xF, t[r].int() >> 4):
                    rows.append(torch.where(nibble >= 8, nibble - 16, nibble).float())
            q = torch.stack(rows)
            w = q * scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)
            pre_quant = tensors.get(name.replace(".weight", ".pre_quant_scale"))
            if pre_quant is not None:
                w = w * pre_quant.float()  # (x * s) W^T == x (W * s)^T
        out[name] = w
    return out


def reference_model(path: Path, tmp_path: Path):
    """transformers' unquantized model on the dequantized weights, fp32."""
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    (ref_dir / "config.json").write_text(json.dumps(config))
    save_file(dequantize_by_hand(path), ref_dir / "model.safetensors", metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def our_logits(model) -> torch.Tensor:
    ids = torch.arange(NUM_TOKENS) * 37 % 320
    metadata = AttentionMetadata.for_prefill([NUM_TOKENS], "cpu")
    return model.compute_logits(model(ids, torch.arange(NUM_TOKENS), metadata))


@pytest.mark.parametrize("fmt", ["int4-awq", "int4-wo"])
def test_int4_logits_match_dequantized_reference(exported, tmp_path, fmt):
    path = exported(fmt)
    model, _ = load_model(path, dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert model.model.layers[0].self_attn.qkv_proj.group_size == 64
    assert model.model.layers[0].mlp.down_proj.group_size == 128
    has_pre_quant = model.model.layers[0].mlp.down_proj.pre_quant_scale is not None
    assert has_pre_quant == (fmt == "int4-awq")
    ours = our_logits(model)
    with torch.inference_mode():
        ref = reference_model(path, tmp_path)(torch.arange(NUM_TOKENS)[None] * 37 % 320).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_fp8_logits_match_dequantized_reference(exported, tmp_path):
    path = exported("fp8")
    model, _ = load_model(path, dtype=torch.float32)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    assert qkv.weight_scale.shape == (3,)  # one scale per shard, no requantization
    ours = our_logits(model)
    with torch.inference_mode():
        ref = reference_model(path, tmp_path)(torch.arange(NUM_TOKENS)[None] * 37 % 320).logits[0]
    # Ours also rounds activations to E4M3 (as the W8A8 GEMM does); the reference does not.
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 0.05
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_fp8_linear_quantizes_activation_with_input_scale():
    torch.manual_seed(0)
    layer = Fp8Linear(16, [8, 4], {"a": (0, 8), "b": (8, 4)}, bias=False)
    w = torch.randn(12, 16)
    scales = torch.tensor([0.01, 0.002])
    for sid, rows, scale in (("a", slice(0, 8), scales[0]), ("b", slice(8, 12), scales[1])):
        layer.weight_loader(
            layer.weight, (w[rows] / scale).clamp(-448, 448).to(torch.float8_e4m3fn), sid
        )  # in range: torch 2.11 casts overflow to NaN
        layer.weight_loader(layer.weight_scale, scale.clone(), sid)
        layer.weight_loader(layer.input_scale, torch.tensor(0.02), sid)
    x = torch.randn(5, 16)
    w_deq = layer.weight.float() * torch.tensor([0.01] * 8 + [0.002] * 4)[:, None]
    expected = fake_quant_fp8(x, torch.tensor(0.02)) @ w_deq.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_fp8_kv_scales_load_into_attention(exported):
    model, _ = load_model(exported("fp8", "fp8"))
    attn = model.model.layers[1].self_attn.attn
    assert attn.k_scale.dtype == torch.float32 and attn.k_scale.item() > 0 and attn.v_scale.item() > 0
    assert torch.isfinite(our_logits(model)).all()


def test_bf16_load_keeps_quantized_dtypes(exported):
    model, _ = load_model(exported("int4-awq"), dtype=torch.bfloat16)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.uint8 and down.weight_scale.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(our_logits(model)).all()


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int4-awq"])
def test_down_projection_given_gate_up_equals_the_separate_silu(exported, tiny_llama_dir, fmt, monkeypatch):
    # `gated=True` (KILN_FUSE_SILU_INTO_GEMV on a GPU) through each kind of linear layer: where no gated GEMV
    # runs (here, the CPU) the layer applies SiLU-and-mul itself, exactly as the separate step does.
    import kiln.models.llama as llama

    model, config = load_model(tiny_llama_dir if fmt == "bf16" else exported(fmt), dtype=torch.float32)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = mlp(x)
        monkeypatch.setattr(llama, "silu_fused_into_next_product", lambda gate_up: True)
        assert torch.equal(mlp(x), expected)
