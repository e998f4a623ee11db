"""Architecture presets for `--dummy-weights`: published model shapes, written out for the project.

Each is the set of config.json fields that decides a model's shape and cost (from the models' public
configuration files); weights are random, made on the device, so benchmarks need no downloads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kiln.core.errors import UserInputError
from kiln.core.hf_checkpoint import TOKENIZER_FILES, read_json_object

_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "bos_token_id": 128000, "eos_token_id": 128001}  # fmt: skip
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                   "rope_theta": 500000.0},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                     "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                    "rope_theta": 500000.0},
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                     "rope_theta": 500000.0, "rope_scaling": {**_LLAMA31_ROPE, "factor": 32.0},
                     "tie_word_embeddings": True, "head_dim": 64},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32768,
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
                   "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643,
                   "eos_token_id": 151645},
}  # fmt: skip


# ModelOpt `quantization_config`s for quantized dummy models (the formats `kiln quantize` writes).
DUMMY_QUANTIZATIONS: dict[str, dict[str, Any]] = {
    "fp8": {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "ignore": ["lm_head"]},
    "int4-awq": {"quant_method": "modelopt", "quant_algo": "W4A16_AWQ", "group_size": 128, "ignore": ["lm_head"]},
}


def dummy_model_dir(spec: str, cache_dir: Path, quantization: str | None = None) -> Path:
    """A directory holding the config.json of a preset name or of a given config.json path (or model
    directory), and that directory's tokenizer files if it has any.

    With a tokenizer, engines and servers of the random weights take text prompts, as vLLM's dummy
    weights keep the model directory's tokenizer. quantization: fp8 or int4-awq adds the
    quantization_config the random weights then follow.
    """
    source_dir = None
    if spec in PRESETS:
        config, name = PRESETS[spec], spec
    else:
        path = Path(spec)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise UserInputError(f"unknown preset {spec!r}: use one of {', '.join(PRESETS)} or a config.json path")
        config = read_json_object(path)
        name = path.parent.name or "config"
        source_dir = path.parent
    if quantization is not None:
        if quantization not in DUMMY_QUANTIZATIONS:
            raise UserInputError(f"--dummy-quantization must be one of {', '.join(DUMMY_QUANTIZATIONS)}")
        config = {**config, "quantization_config": DUMMY_QUANTIZATIONS[quantization]}
        name = f"{name}-{quantization}"
    out = cache_dir / "dummy" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for file_name in TOKENIZER_FILES:  # the directory is reused per name: no tokenizer left from another source
        (out / file_name).unlink(missing_ok=True)
        if source_dir is not None and (source_dir / file_name).is_file():
            shutil.copyfile(source_dir / file_name, out / file_name)
    return out
