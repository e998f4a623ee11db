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
def word_activations(x_row, pre_quant_scale_ptr, cols, col_mask, HAS_PRE_QUANT_SCALE: tl.constexpr):
    """The activations x_j [C] fp32 (times the AWQ pre-quant scale, if any) at K positions 4c + j of each word
    column c, j = 0..3: the operands of word_nibbles' and half2_pairs' products."""
    x0 = tl.load(x_row + 4 * cols, mask=col_mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_row + 4 * cols + 1, mask=col_mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + 4 * cols + 2, mask=col_mask, other=0.0).to(tl.float32)
    x3 = tl.load(x_row + 4 * cols + 3, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_PRE_QUANT_SCALE:
        x0 *= tl.load(pre_quant_scale_ptr + 4 * cols, mask=col_mask, other=0.0).to(tl.float32)
        x1 *= tl.load(pre_quant_scale_ptr + 4 * cols + 1, mask=col_mask, other=0.0).to(tl.float32)
        x2 *= tl.load(pre_quant_scale_ptr + 4 * cols + 2, mask=col_mask, other=0.0).to(tl.float32)
        x3 *= tl.load(pre_quant_scale_ptr + 4 * cols + 3, mask=col_mask, other=0.0).to(tl.float32)
    return x0, x1, x2, x3


# The half2 recipe (`half2_rows_parts`, KILN_INT4_GEMV_UNPACK=half2): nibbles become fp16 pairs and meet the
# activations in fp16x2 products, two weights an instruction. For each word, LOP3 with LUT 0x6A computes
# (mask ? word ^ C : C) bit by bit with C = 0x6408 (or 0x6480) in both halves: inside the masked nibbles it flips
# bit 3 (two's complement s -> s + 8) and elsewhere writes the exponent of fp16 1024, so each 16-bit half is the
# number 1024 + s + 8 (nibble at bits 0-3) or 1152 + 16 s (bits 4-7). One instruction leaves s, exactly: a SUB of
# 1032 for the low nibble, an FMA by 1/16 less 72 for the high one (so both meet the same activations). Bits 0-3
# and 16-19 of a word are K positions 0 and 2 of the even row, bits 4-7 and 20-23 the odd row's; the word shifted
# right by 8 gives positions 1 and 3. Activations come as fp16 pairs (x0, x2) and (x1, x3), divided by 16 so that
# no fp16 product or sum overflows; four words (16 K positions) add up in fp16x2 before the two halves go to fp32.
def _half2_asm(rows: int) -> str:
    """The half2 recipe's PTX for `rows` activation rows: each word's nibbles are unpacked once for all rows.
    Operands: outputs $0 .. $(2 rows - 1) (row r: even sum $(2r), odd $(2r + 1)); then the four words; then
    for each row r and word i, the activation pairs (x0, x2) and (x1, x3) of that word."""
    first_x = 2 * rows + 4
    sums = ", ".join(f"se{r}, so{r}" for r in range(rows))
    text = f"""
{{
.reg .b32 w8, e02, o02, e13, o13, {sums}, ce, co, sixteenth, minus72;
.reg .b16 lo, hi;
.reg .f32 fa, fb;
mov.b32 ce, 0x64086408;
mov.b32 co, 0x64806480;
mov.b32 sixteenth, 0x2C002C00;
mov.b32 minus72, 0xD480D480;
"""
    for i in range(4):
        word = f"${2 * rows + i}"
        text += f"""
shr.u32 w8, {word}, 8;
lop3.b32 e02, {word}, 0x000F000F, ce, 0x6A;
lop3.b32 o02, {word}, 0x00F000F0, co, 0x6A;
lop3.b32 e13, w8, 0x000F000F, ce, 0x6A;
lop3.b32 o13, w8, 0x00F000F0, co, 0x6A;
sub.f16x2 e02, e02, ce;
fma.rn.f16x2 o02, o02, sixteenth, minus72;
sub.f16x2 e13, e13, ce;
fma.rn.f16x2 o13, o13, sixteenth, minus72;
"""
        for r in range(rows):
            x02, x13 = f"${first_x + 8 * r + 2 * i}", f"${first_x + 8 * r + 2 * i + 1}"
            for sum_, w02, w13 in ((f"se{r}", "e02", "e13"), (f"so{r}", "o02", "o13")):
                first = f"mul.rn.f16x2 {sum_}, {w02}, {x02};\n"  # the sum starts with the first word
                text += first if i == 0 else f"fma.rn.f16x2 {sum_}, {w02}, {x02}, {sum_};\n"
                text += f"fma.rn.f16x2 {sum_}, {w13}, {x13}, {sum_};\n"
    for r in range(rows):
        for j, sum_ in enumerate((f"se{r}", f"so{r}")):
            text += f"""mov.b32 {{lo, hi}}, {sum_};
cvt.f32.f16 fa, lo;
cvt.f32.f16 fb, hi;
add.f32 ${2 * r + j}, fa, fb;
"""
    return text + "}\n"


_HALF2_ASM = tl.constexpr(_half2_asm(1))
_HALF2_ASM_2_ROWS = tl.constexpr(_half2_asm(2))
_HALF2_ASM_4_ROWS = tl.constexpr(_half2_asm(4))


@triton.jit
def _fp16_pair(lo, hi):
    """Two fp32 tensors -> int32 words holding them as fp16 (lo in bits 0-15, hi in bits 16-31)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], tl.int32, True, 1)


@triton.jit
def _quarters(t):
    """[R, C] -> four [R, C / 4] tensors: columns 4j, 4j + 1, 4j + 2, 4j + 3 (registers of one thread: no copy)."""
    a, b = tl.split(tl.reshape(t, [t.shape[0], t.shape[1] // 4, 2, 2]))  # a: columns 4j + 2p, b: 4j + 2p + 1
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def half2_pairs(x0, x1, x2, x3):
    """One row's activations x_j [C] (fp32) as the half2 recipe's operands: for each of a thread's four word
    columns, the fp16 pairs (x0, x2) and (x1, x3) divided by 16 (a tuple of 8 tensors [1, C / 4])."""
    x02 = _quarters(_fp16_pair(x0 * 0.0625, x2 * 0.0625)[None, :])
    x13 = _quarters(_fp16_pair(x1 * 0.0625, x3 * 0.0625)[None, :])
    return x02[0], x13[0], x02[1], x13[1], x02[2], x13[2], x02[3], x13[3]


@triton.jit
def half2_rows_parts(words, a, b, c, d, ROWS: tl.constexpr):
    """A words tile [HALF_N, C] times ROWS (1, 2 or 4) activation rows on fp16x2, each word unpacked once for all
    rows; a, b, c, d are the rows' half2_pairs (None past ROWS). Returns (even, odd) of row 0, then of row 1, ...:
    [HALF_N, C / 4] fp32, each the sum over the 4 word columns (16 K positions) one thread holds, divided by 16,
    so the caller takes the sums across threads (and the factor 16) when it chooses."""
    w0, w1, w2, w3 = _quarters(words)
    if ROWS == 1:
        parts = tl.inline_asm_elementwise(
            _HALF2_ASM, "=r,=r" + ",r" * 12, (w0, w1, w2, w3) + a, (tl.float32,) * 2, True, 1
        )
    elif ROWS == 2:
        parts = tl.inline_asm_elementwise(
            _HALF2_ASM_2_ROWS, "=r," * 3 + "=r" + ",r" * 20, (w0, w1, w2, w3) + a + b, (tl.float32,) * 4, True, 1
        )
    else:
        parts = tl.inline_asm_elementwise(
            _HALF2_ASM_4_ROWS, "=r," * 7 + "=r" + ",r" * 36, (w0, w1, w2, w3) + a + b + c + d, (tl.float32,) * 8,
            True, 1,
        )  # fmt: skip
    return parts


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
