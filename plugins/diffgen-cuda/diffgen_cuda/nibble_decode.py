"""The byte decode of the 4-bit dequantize pass (``kernels.w4_gemm``'s pair pass): one packed byte
(element 2i in the low nibble, 2i + 1 in the high) becomes both its values as an f16x2 word in five
integer instructions, written here once as PTX text and once as the same arithmetic in torch, so
that the arithmetic is tested on any machine. No Triton import.

E2M1 (s|ee|m): the byte times SPREAD puts a copy of it at bit 9 and one at bit 21, so the low
nibble sits at bits 9..12 and the high one at 25..28. Keeping those (NIBBLES) and adding seven
times their sign bits (SIGNS) moves each sign from bit 12 to 15 (28 to 31) and clears it where it
was: the word holds two fp16 whose exponent field is ee and whose top mantissa bit is m, which is
the code times 2^-14, code 1 (0.5) included as the subnormal 2^-15. The pass multiplies by the
block scale times 2^14, an exact product as long as that scale times 2^14 is finite (scales below
2^113, which every E4M3 scale and every E8M0 exponent below 241 is).
int4 (two's complement): the byte times 0x1001 puts the low nibble at bits 0..3 and the high one at
16..19; keeping them and XOR-ing 0x6408 into each half gives the fp16 1024 + (c ^ 8), and
subtracting 1032 (in f16x2, exact) leaves the signed code.
"""

from __future__ import annotations

import torch

E2M1, INT4 = 0, 1  # as packed4's CODES

SPREAD = {E2M1: 0x200200, INT4: 0x1001}
NIBBLES = {E2M1: 0x1E001E00, INT4: 0x000F000F}
SIGNS = 0x10001000  # E2M1's sign bits after the spread
INT4_BIAS = 0x64086408  # two fp16 1032s: XOR-ed into the int4 nibbles, then subtracted
UNIT = {E2M1: 2.0 ** -14, INT4: 1.0}  # a decoded value is the code times this


def _half_words(codes: int) -> list[str]:
    """PTX for one byte: t holds the byte (zero-extended); leaves the f16x2 word in t."""
    lines = [f"mul.lo.u32 t, t, {SPREAD[codes]:#x};", f"and.b32 n, t, {NIBBLES[codes]:#x};"]
    if codes == E2M1:
        lines += [f"and.b32 s, t, {SIGNS:#x};", "mad.lo.u32 t, s, 7, n;"]
    else:
        lines += [f"xor.b32 t, n, {INT4_BIAS:#x};", f"mov.b32 s, {INT4_BIAS:#x};", "sub.rn.f16x2 t, t, s;"]
    return lines


def ptx(codes: int) -> str:
    """Inline PTX for ``tl.inline_asm_elementwise(..., pack=4)``: operands $0..$3 the low nibbles'
    fp32 values and $4..$7 the high nibbles' of four bytes, $8 the four bytes, $9..$12 each byte's
    scale factor f (block scale / UNIT) and $13..$16 its row factor; each value is (decoded * f) *
    row, the two products rounded in that order as the format's definition multiplies."""
    body = [".reg .b32 t, n, s;", ".reg .b16 l, h;"]
    for i in range(4):
        body += [f"prmt.b32 t, $8, 0, {0x4440 + i:#x};", *_half_words(codes), "mov.b32 {l, h}, t;",
                 f"cvt.f32.f16 ${i}, l;", f"cvt.f32.f16 ${4 + i}, h;"]
        for out in (i, 4 + i):
            body += [f"mul.rn.f32 ${out}, ${out}, ${9 + i};", f"mul.rn.f32 ${out}, ${out}, ${13 + i};"]
    return "{\n" + "\n".join(body) + "\n}"


CONSTRAINTS = ",".join(["=f"] * 8 + ["r"] + ["f"] * 8)


def decode_bytes(packed: torch.Tensor, codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The PTX's integer arithmetic in torch: uint8 bytes -> the (low, high) nibbles' codes times
    UNIT, as fp32."""
    t = packed.to(torch.int64) * SPREAD[codes]
    n = t & NIBBLES[codes]
    word = n + 7 * (t & SIGNS) if codes == E2M1 else n ^ INT4_BIAS
    halves = [((word >> shift) & 0xFFFF).to(torch.int16).view(torch.float16).float() for shift in (0, 16)]
    if codes == INT4:
        halves = [h - 1032.0 for h in halves]
    return halves[0], halves[1]
