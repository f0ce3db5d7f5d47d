"""Constants of the FP8 attention math that both kernels compute (``attention_fp8``, Triton, and
``attention_gluon``, Gluon), in one place so the two cannot drift apart."""

import triton.language as tl

P_EXPONENT_OFFSET = tl.constexpr(8.0)  # P = exp2(S - m + 8) <= 256 < 448, E4M3's largest
# |s| <= 127 * 127 * 128 < 2^22 for INT8 scores: the bits of 1.5 * 2^23 + s are MAGIC_BITS + s, so an
# integer add and a bitcast give 1.5 * 2^23 + s exactly, and subtracting MAGIC leaves s
MAGIC_BITS, MAGIC = tl.constexpr(0x4B400000), tl.constexpr(12582912.0)
