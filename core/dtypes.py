"""Names of the floating-point dtypes kiln accepts on the command line and in configs."""

import torch

from kiln.core.errors import UserInputError

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn: FP8 weights, activations and KV caches saturate here

DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
# Spellings found in Hugging Face config.json ("torch_dtype"/"dtype") and in user input.
_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
}


# Every spelling canonical_dtype_name accepts (lower case, without "torch.").
KNOWN_DTYPE_SPELLINGS = frozenset(DTYPE_BY_NAME) | frozenset(_ALIASES)


def canonical_dtype_name(name: str) -> str:
    """Map any accepted spelling ("bfloat16", "bf16", "torch.bfloat16") to bf16/fp16/fp32."""
    key = name.removeprefix("torch.").lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPE_BY_NAME:
        raise UserInputError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_BY_NAME)}")
    return key


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an accepted dtype name."""
    return DTYPE_BY_NAME[canonical_dtype_name(name)]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (bf16/fp16/fp32) of a torch floating dtype."""
    for name, value in DTYPE_BY_NAME.items():
        if value == dtype:
            return name
    raise UserInputError(f"dtype {dtype} is not a supported floating dtype")


def hf_dtype_string(name: str) -> str:
    """The spelling Hugging Face writes in config.json for a dtype name."""
    return str(torch_dtype(name)).removeprefix("torch.")


def cpu_has_fast_half_precision() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without, bf16 matmuls are
    several times slower than fp32 (measured ~5x on our 2-core build machines)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
