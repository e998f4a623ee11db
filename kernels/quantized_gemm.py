"""Quantized linear products: the GPU kernels where they can run, the PyTorch reference everywhere else.

FP8 W8A8: the activation is quantized with its static per-tensor `input_scale` (Triton kernel), then
`torch._scaled_mm` multiplies on FP8 tensor cores (compute capability 8.9+) with a per-tensor weight
scale, or a per-output-channel one when fused shards were calibrated separately. A few rows (decode)
take `triton_fp8_gemv` instead: quantization, product and split-K reduction in one launch. INT4 W4A16: the
Triton GEMM of `triton_w4a16_gemm`. The references compute in fp32 from the dequantized tensors and are
the CPU path and the oracle the kernels are tested against.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from kiln.core.dtypes import FP8_E4M3_MAX

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fp8_gemv_enabled() -> bool:
    """KILN_DISABLE_FP8_GEMV=1 sends small batches to `_scaled_mm` too (A/B benchmarks)."""
    return os.environ.get("KILN_DISABLE_FP8_GEMV") != "1"


def gpu_kernels_available(x: torch.Tensor, needs_fp8: bool) -> bool:
    """Whether the Triton / `_scaled_mm` path can take this activation (CUDA, 16-bit, triton installed)."""
    if x.device.type != "cuda" or x.dtype not in KERNEL_DTYPES or not _triton_installed():
        return False
    return not needs_fp8 or _cuda_capability(x.device) >= (8, 9)


def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clamp(x / scale, +-448) rounded to float8_e4m3fn."""
    return (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    channel_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] -> [M, N]: E4M3 activation x E4M3 weight [N, K], fp32 accumulate, scaled per output channel."""
    x_q = quantize_fp8_reference(x, input_scale)
    out = (x_q.float() @ weight.float().T) * (input_scale.float() * channel_scale.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    channel_scale: torch.Tensor,
    bias: torch.Tensor | None,
    tensor_weight_scale: torch.Tensor | None,
    gated: bool = False,
) -> torch.Tensor:
    """FP8 W8A8 linear; `tensor_weight_scale` (one element) when every output channel shares one scale.

    x [M, K]; weight float8_e4m3fn [N, K]; input_scale one fp32 element; channel_scale fp32 [N].
    gated (CUDA with Triton only): x is [M, 2K] = [gate | up] and the product takes silu(gate) * up.
    """
    kernels = gpu_kernels_available(x, needs_fp8=True) and not (weight.shape[1] % 16 or weight.shape[0] % 16)
    if kernels:
        from kiln.kernels.triton_fp8_gemv import FP8_GEMV_CONFIG, fp8_gemv

        if 0 < x.shape[0] <= FP8_GEMV_CONFIG["max_rows"] and _fp8_gemv_enabled():
            return fp8_gemv(x, weight, input_scale, channel_scale, bias, gated)  # decode: one bandwidth-bound launch
    if gated:
        x = silu_and_mul_rows(x)
    if not kernels:
        return fp8_linear_reference(x, weight, input_scale, channel_scale, bias)
    from kiln.kernels.triton_fp8_quant import quantize_fp8_static

    x_q, row_scale = quantize_fp8_static(x, input_scale)
    # fast accumulation: Hopper's FP8 tensor-core accumulator, as TensorRT-LLM's FP8 GEMMs use.
    if tensor_weight_scale is not None:
        out = torch._scaled_mm(
            x_q, weight.t(), scale_a=input_scale, scale_b=tensor_weight_scale, out_dtype=x.dtype, use_fast_accum=True
        )
    elif x.dtype == torch.bfloat16:
        out = torch._scaled_mm(
            x_q,
            weight.t(),
            scale_a=row_scale,
            scale_b=channel_scale.view(1, -1),
            out_dtype=x.dtype,
            use_fast_accum=True,
        )
    else:
        # Row-wise scaling needs a bf16 output; for fp16, scale the fp32 product per channel instead.
        one = torch.ones((), dtype=torch.float32, device=x.device)
        out32 = torch._scaled_mm(x_q, weight.t(), scale_a=input_scale, scale_b=one, out_dtype=torch.float32)
        out = (out32 * channel_scale).to(x.dtype)
    return out + bias if bias is not None else out


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out / 2, in] (rows 2r, 2r+1 in the low, high nibble) -> signed int8 [out, in]."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    pairs = torch.stack([low, high], dim=1)  # [out / 2, 2, in]
    pairs = torch.where(pairs >= 8, pairs - 16, pairs)
    return pairs.reshape(-1, packed.shape[-1])


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in] weight: int4 values times their group's scale (scales [out, in / group])."""
    group_size = packed.shape[1] // scales.shape[1]
    return unpack_int4(packed).float() * scales.float().repeat_interleave(group_size, dim=1)


def int4_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] -> [M, N]: (x * pre_quant_scale) @ dequantized weight^T, fp32 accumulate."""
    x32 = x.float()
    if pre_quant_scale is not None:
        x32 = x32 * pre_quant_scale.float()
    out = x32 @ dequantize_int4(packed, scales).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    gated: bool = False,
) -> torch.Tensor:
    """W4A16 linear: the Triton GEMM on CUDA with fp16/bf16 activations, else the reference.

    gated (CUDA with Triton only): x is [M, 2K] = [gate | up] and the product takes silu(gate) * up,
    computed first by the SiLU-and-mul kernel: the INT4 GEMV is bound by instruction issue, and the
    SiLU of every loaded activation would add ~45% to its loop (SASS), more than the launch it saves.
    """
    if gated:
        x = silu_and_mul_rows(x)
    if not gpu_kernels_available(x, needs_fp8=False):
        return int4_linear_reference(x, packed, scales, pre_quant_scale, bias)
    from kiln.kernels.triton_w4a16_gemm import w4a16_linear

    return w4a16_linear(x, packed, scales, pre_quant_scale, bias)


def silu_and_mul_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [M, 2K] rows, for a gated product that takes another path than a gated GEMV: the
    SiLU-and-mul kernel where a GEMV would run (CUDA with Triton), else models.layers' reference formula."""
    if gpu_kernels_available(gate_up, needs_fp8=False):
        from kiln.kernels.triton_fused_ops import silu_and_mul

        return silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
