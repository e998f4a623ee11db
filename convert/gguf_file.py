"""Reading a GGUF file for conversion: config and tokenizer through transformers, tensors streamed.

transformers' own GGUF loader dequantizes every tensor at once; we reuse its config, tokenizer and
name mapping but dequantize one tensor at a time with the `gguf` package, so memory stays near the
largest tensor.
"""

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.core.errors import SourceError, UnsupportedArchitectureError
from kiln.core.hashing import sha256_file
from kiln.core.manifest import ParentRef

logger = logging.getLogger(__name__)

# GGUF `model_type` (as transformers reads it) -> the Hugging Face architecture kiln implements.
ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# GGUF general.file_type -> what `--dtype auto` becomes; quantized files become bf16.
_AUTO_DTYPE_BY_FILE_TYPE = {0: "fp32", 1: "fp16", 32: "bf16"}


class GGUFSource:
    """A GGUF file (llama.cpp format), possibly quantized."""

    def __init__(self, path: Path, parent_kind: str = "gguf") -> None:
        import gguf

        self.path = path
        self.parent_kind = parent_kind
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, KeyError, IndexError) as exc:
            raise SourceError(f"{path.name} is not a readable GGUF file ({exc})") from exc
        self._config = self._load_config()

    def hf_config(self) -> dict[str, Any]:
        return dict(self._config)

    def source_dtype(self) -> str:
        field = self.reader.fields.get("general.file_type")
        file_type = int(field.contents()) if field is not None else -1
        return _AUTO_DTYPE_BY_FILE_TYPE.get(file_type, "bf16")

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from gguf.quants import dequantize

        name_map, processor = self._name_map_and_processor()
        for tensor in self.reader.tensors:
            hf_name = name_map.get(tensor.name)
            if hf_name is None:
                raise SourceError(f"{self.path.name}: tensor {tensor.name} has no Hugging Face counterpart")
            # [rows, cols] in numpy order, float32
            weights = dequantize(tensor.data, tensor.tensor_type)
            weights = processor.process(weights=weights, name=tensor.name).weights  # undo llama.cpp's q/k permutation
            weights = np.ascontiguousarray(weights, dtype=np.float32)
            if not weights.flags.writeable:  # unquantized tensors are views of the read-only memory map
                weights = weights.copy()
            yield hf_name, torch.from_numpy(weights)

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        if not tokenizer.chat_template:
            logger.warning("%s has no chat template; chat requests will need one", self.path.name)
        before = set(out_dir.iterdir())
        tokenizer.save_pretrained(str(out_dir))
        return sorted(path.name for path in set(out_dir.iterdir()) - before)

    def generation_config(self) -> dict[str, Any] | None:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        return {key: self._config[key] for key in keys if self._config.get(key) is not None}

    def parent(self) -> ParentRef:
        return ParentRef(
            kind=self.parent_kind, source=str(self.path.absolute()), digest="sha256:" + sha256_file(self.path)
        )

    def _load_config(self) -> dict[str, Any]:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except ValueError as exc:  # transformers' word for an architecture its GGUF reader lacks
            raise UnsupportedArchitectureError(f"{self.path.name}: {exc}") from exc
        architecture = ARCHITECTURE_BY_MODEL_TYPE.get(config.model_type)
        if architecture is None:
            supported = ", ".join(sorted(ARCHITECTURE_BY_MODEL_TYPE))
            raise UnsupportedArchitectureError(
                f"{self.path.name} holds a {config.model_type!r} model; kiln converts GGUF files of: {supported}"
            )
        config.architectures = [architecture]
        data = config.to_dict()
        data.pop("_model_name_or_path", None)  # the GGUF's display name, not a path
        return data

    def _name_map_and_processor(self) -> tuple[dict[str, str], Any]:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        config = AutoConfig.for_model(**self._config)
        # The HF model on the meta device only provides parameter names for the mapping: no memory.
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(config)
        gguf_architecture = str(self.reader.fields["general.architecture"].contents())
        processor = TENSOR_PROCESSORS.get(gguf_architecture, TensorProcessor)(config=self._config)
        return get_gguf_hf_weights_map(hf_model, processor), processor
