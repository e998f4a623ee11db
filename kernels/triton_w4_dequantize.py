"""Dequantizing ModelOpt's packed INT4 weights in Triton (reference: `quantized_gemm.dequantize_int4`).

`packed` uint8 [N / 2, K] holds output rows 2r (low nibble) and 2r + 1 (high nibble) of a signed int4
weight; `scales` fp32 [N, K / group]. The W4A16 GEMM uses `signed_nibbles` in its kernels and
`dequantize_w4` for large batches, where one 16-bit copy of the weight feeds cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Swept on an H200 (bf16, group 128, Llama-3-8B shapes, 2026-11-28): 3.4 TB/s for gate_up.
DEQUANT_CONFIG = {"block_p": 32, "block_k": 128, "num_warps": 8}


@triton.jit
def signed_nibbles(packed):
    """uint8 -> (low, high) signed int4 values as int8 tensors."""
    signed = packed.to(tl.int8, bitcast=True)
    # Arithmetic shifts sign-extend: the low nibble moves to the top and back, the high one down.
    return (signed << 4) >> 4, signed >> 4


# 2**23 + 8: a float whose low mantissa bits are an excess-8 nibble e is 2**23 + e, i.e. this plus the value.
_EXCESS_8_MAGIC = tl.constexpr(8388616.0)


@triton.jit
def signed_nibbles_fp32(packed):
    """uint8 -> (low, high) signed int4 values as fp32, without int-to-float conversion instructions.

    Those run at a quarter of the FMA rate and bound a CUDA-core GEMV well under the memory bandwidth.
    XOR 8 turns a two's-complement nibble s into s + 8; OR-ing that into the mantissa of 2**23 gives
    the float 2**23 + s + 8 exactly, and one subtraction leaves s.
    """
    excess = packed.to(tl.int32) ^ 0x88
    low = ((excess & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - _EXCESS_8_MAGIC
    high = (((excess >> 4) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - _EXCESS_8_MAGIC
    return low, high


# Where word_nibbles leaves each nibble of a little-endian word of 4 packed bytes (4 K positions j, the low
# nibble an even output row, the high one the odd row): its bit position p, so the float it makes is s * 2**p.
# Bits 20-31 are first shifted down by 12: a nibble must sit in the 23 mantissa bits. The nibble positions:
#   low (even row),  j = 0..3: p = 0, 8, 16, 12 (j = 3, bits 24-27, after the shift)
#   high (odd row),  j = 0..3: p = 4, 12, 8, 16 (j = 2 and 3, bits 20-23 and 28-31, after the shift)


# One XOR constant for every nibble position p of word_nibbles: the exponent bits of the float 2**23 plus bit
# p + 3 of each position (0x8 << p), so (word & (0xF << p)) ^ it is 2**23 + (s + 8) * 2**p plus 8 * 2**q for
# the other positions q (bits that the mask cleared, so they do not overlap the nibble): an exact integer
# below 2**24, and subtracting NIBBLE_FLOAT_OFFSET leaves s * 2**p exactly. word_nibbles takes it as a
# run-time argument, so that ptxas keeps it in a register: a LOP3 instruction has room for one immediate,
# and with both constants known at compile time every nibble took two LOP3s (seen in the SASS).
NIBBLE_XOR_BITS = 0x4B000000 | 0x88888
NIBBLE_FLOAT_OFFSET = tl.constexpr(float(2**23 + 0x88888))


@triton.jit
def _nibble_at(word, p: tl.constexpr, xor_bits):
    """The signed nibble at bits p..p+3 (p <= 16) of an int32 word, times 2**p, as fp32: a LOP3 and a FADD."""
    bits = (word & (0xF << p)) ^ xor_bits
    return bits.to(tl.float32, bitcast=True) - NIBBLE_FLOAT_OFFSET


@triton.jit
def word_nibbles(words, xor_bits):
    """int32 words of 4 packed bytes -> 8 fp32 tensors: low nibbles j = 0..3, then high nibbles j = 0..3.

    Each is s * 2**p for the bit positions p listed above the function (multiply the matching
    activation by 2**-p). `xor_bits` is NIBBLE_XOR_BITS, passed at run time (see there). About 2.1
    instructions a weight, against ~5.5 for bytes unpacked one at a time (byte extraction, sign extension,
    separate mask, XOR and OR), which kept a CUDA-core GEMV bound by instruction issue.
    """
    shifted = (words.to(tl.uint32, bitcast=True) >> 12).to(tl.int32, bitcast=True)
    return (
        _nibble_at(words, 0, xor_bits), _nibble_at(words, 8, xor_bits), _nibble_at(words, 16, xor_bits),
        _nibble_at(shifted, 12, xor_bits), _nibble_at(words, 4, xor_bits), _nibble_at(words, 12, xor_bits),
        _nibble_at(shifted, 8, xor_bits), _nibble_at(shifted, 16, xor_bits),
    )  # fmt: skip


@triton.jit
def _dequantize_kernel(
    w_ptr,
    scales_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # packed [N / 2, K] -> out [N, K] in the activations' dtype; a program does BLOCK_P packed rows.
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (pairs < N // 2)[:, None] & (ks < K)[None, :]
    even = 2 * pairs.to(tl.int64)
    low, high = signed_nibbles(tl.load(w_ptr + pairs[:, None].to(tl.int64) * stride_wn + ks[None, :], mask=mask))
    if GROUP_SIZE % BLOCK_K == 0:  # the tile lies in one group: one scale per row
        group = tl.program_id(1) * BLOCK_K // GROUP_SIZE
        s_even = tl.load(scales_ptr + even * stride_sn + group, mask=pairs < N // 2, other=0.0)[:, None]
        s_odd = tl.load(scales_ptr + (even + 1) * stride_sn + group, mask=pairs < N // 2, other=0.0)[:, None]
    else:
        groups = ks // GROUP_SIZE
        s_even = tl.load(scales_ptr + even[:, None] * stride_sn + groups[None, :], mask=mask, other=0.0)
        s_odd = tl.load(scales_ptr + (even + 1)[:, None] * stride_sn + groups[None, :], mask=mask, other=0.0)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + even[:, None] * stride_on + ks[None, :], (low.to(tl.float32) * s_even).to(out_dtype), mask=mask)
    tl.store(
        out_ptr + (even + 1)[:, None] * stride_on + ks[None, :], (high.to(tl.float32) * s_odd).to(out_dtype), mask=mask
    )


def dequantize_w4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype` (reference: `quantized_gemm.dequantize_int4`, which is fp32)."""
    n, k = packed.shape[0] * 2, packed.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    block_p, block_k = DEQUANT_CONFIG["block_p"], DEQUANT_CONFIG["block_k"]
    grid = (triton.cdiv(n // 2, block_p), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](
        packed, scales, out, n, k, packed.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=k // scales.shape[1], BLOCK_P=block_p, BLOCK_K=block_k, num_warps=DEQUANT_CONFIG["num_warps"],
    )  # fmt: skip
    return out
