"""Static per-tensor FP8 activation quantization in Triton (reference: `quantized_gemm.quantize_fp8_reference`).

x [M, K] -> clamp(x / scale, +-448) as float8_e4m3fn, plus the scale repeated per row ([M, 1] fp32),
which `torch._scaled_mm` wants for row-wise scaling. The scale is read from device memory, so the
kernel never syncs with the host and replays correctly inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.core.dtypes import FP8_E4M3_MAX

FP8_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)


@triton.jit
def _quantize_fp8_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    row_scale_ptr,
    K,
    stride_xm,
    stride_om,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = ks < K
        x = tl.load(x_ptr + row * stride_xm + ks, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)  # divide, as the reference does: same rounding
        tl.store(out_ptr + row * stride_om + ks, q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(row_scale_ptr + row, scale)


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] and a one-element fp32 scale -> (float8_e4m3fn [M, K], fp32 [M, 1] row scales)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_rows, k = x.shape
    out = torch.empty(num_rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows:
        _quantize_fp8_kernel[(num_rows,)](
            x, out, scale, row_scale, k, x.stride(0), out.stride(0), BLOCK_K=min(1024, triton.next_power_of_2(k))
        )
    return out, row_scale
