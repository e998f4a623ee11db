"""Dense 16-bit linear products: the split-K Triton GEMV for decode rows on CUDA, cuBLAS for the rest.

At one row cuBLAS leaves memory bandwidth unused on smaller weights (the tensor-parallel shards above
all); `triton_dense_gemv` streams the weight over the whole GPU instead. Prefill batches, CPU tensors,
fp32 and installs without Triton keep `F.linear`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kiln.kernels.quantized_gemm import gpu_kernels_available, silu_and_mul_rows


def dense_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) in fp32, cast to x's dtype: the GEMV's oracle."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _dense_gemv_enabled() -> bool:
    """KILN_DISABLE_DENSE_GEMV=1 sends decode rows to cuBLAS too (A/B benchmarks); read on every call."""
    return os.environ.get("KILN_DISABLE_DENSE_GEMV") != "1"


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
    """y = x weight^T (+ bias) for x [..., K], weight [N, K]; a few rows on CUDA take the Triton GEMV.

    gated (CUDA with Triton only): x is [M, 2K] = [gate | up] and the product takes silu(gate) * up.
    """
    if (
        x.dim() == 2
        and x.dtype == weight.dtype
        and weight.is_contiguous()
        and gpu_kernels_available(x, needs_fp8=False)
        and _dense_gemv_enabled()
    ):
        # Imported here: CPU installs have no triton.
        from kiln.kernels.triton_dense_gemv import DENSE_GEMV_CONFIG, dense_gemv

        if 0 < x.shape[0] <= DENSE_GEMV_CONFIG["max_rows"]:
            return dense_gemv(x, weight, bias, gated)
    if gated:
        x = silu_and_mul_rows(x)
    return F.linear(x, weight, bias)
