"""The engine's options, validated once; every field can come from flags, a YAML file or the API."""

import logging
from dataclasses import dataclass

import torch

from kiln.core.dtypes import torch_dtype
from kiln.core.errors import UserInputError
from kiln.kernels.attention_backends import BACKEND_NAMES

logger = logging.getLogger(__name__)


KV_CACHE_DTYPES = ("auto", "fp8", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class EngineConfig:
    """Options of `LLM(...)`, `kiln run` and (later) `kiln serve`; None = sized for the device."""

    dtype: str = "auto"  # auto = the checkpoint's dtype
    device: str = "auto"  # auto = cuda when available
    max_batch_size: int | None = None  # running requests at once (default 256 on GPU, 32 on CPU)
    max_num_tokens: int | None = None  # tokens per step, prefill chunks and decodes together (8192 GPU, 2048 CPU)
    max_seq_len: int | None = None  # prompt + generated tokens per request (default: the model's context)
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # auto = fp8 when the checkpoint carries KV scales, else the model's dtype
    kv_cache_memory_fraction: float = 0.9  # of the GPU's memory, for weights + activations + KV cache
    num_kv_blocks: int | None = None  # fix the KV cache size instead of measuring it
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | torch | triton
    enable_cuda_graphs: bool = True  # decode steps replay captured graphs (CUDA with the Triton backend)
    cuda_graph_batch_sizes: tuple[int, ...] | None = None  # the decode batch sizes captured (None = buckets)
    seed: int = 0  # seeds the requests that bring none, so whole runs reproduce
    dummy_weights: bool = False  # random weights made on the device (benchmarks without checkpoints)
    tp_size: int | None = None  # tensor-parallel ranks (a process per GPU, or gloo on the CPU); None = engine's, else 1
    # pipeline stages, each of tp_size processes (GPUs: eager, no CUDA graphs); None = the engine's, else 1
    pp_size: int | None = None
    tp_timeout_s: float = 60.0  # a rank (or pipeline stage) silent this long ends the run with an error
    # Schedule and launch step N+1 while the GPU runs step N (None = on for one CUDA process, unless the
    # environment sets KILN_DISABLE_ASYNC_SCHEDULING=1); True on the CPU runs the same logic, for tests.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        if self.tp_size is not None and (not isinstance(self.tp_size, int) or self.tp_size < 1):
            raise UserInputError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        if self.pp_size is not None and (
            not isinstance(self.pp_size, int) or isinstance(self.pp_size, bool) or self.pp_size < 1
        ):
            raise UserInputError(f"pp_size must be a positive integer, got {self.pp_size!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise UserInputError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise UserInputError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise UserInputError("num_kv_blocks must be at least 2 (block 0 is reserved)")
        if self.attention_backend not in BACKEND_NAMES:
            raise UserInputError(f"attention_backend must be one of {', '.join(BACKEND_NAMES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise UserInputError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.dtype not in ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"):
            raise UserInputError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available else cpu; a CUDA request without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UserInputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device} asked for a GPU, but torch sees no CUDA device")
    return resolved


def resolve_kv_cache_dtype(requested: str, model_dtype: torch.dtype, has_kv_scales: bool) -> torch.dtype:
    """The KV cache's dtype: `auto` follows the checkpoint (FP8 when it was calibrated for it)."""
    if requested == "auto":
        return torch.float8_e4m3fn if has_kv_scales else model_dtype
    if requested == "fp8":
        if not has_kv_scales:
            logger.warning(
                "fp8 KV cache without calibrated scales: using scale 1.0; "
                "`kiln quantize --kv-cache-dtype fp8` calibrates them"
            )
        return torch.float8_e4m3fn
    return torch_dtype(requested)
