"""4-bit weight x 16-bit activation GEMM with the weight dequantized inside the kernel (W4A16):

  y[m, n] = (sum_k x[m, k] * code(W[n, k]) * s[n, k // GROUP]) * g + b[n]

W packed two 4-bit codes per byte along K (element 2i in the low nibble), [N, Kp/2] uint8; codes
E2M1 (NVFP4, MXFP4) or signed int4 (two's complement); s one scale per GROUP (16, 32 or 64)
elements, E4M3, E8M0 (uint8 exponent, MX) or 16-bit; g an fp32 global scale. Each program
unpacks its [BLOCK_N, BLOCK_K] weight tile in registers: the codes become fp32 by building their
bits (E2M1: sign, exponent + 126, one mantissa bit; 0.5 for the subnormal code), times the block
scale, then x's dtype. That product is exact in bf16 (2 significant bits times 4), so the tile is
the format's dequantized weight and no 16-bit weight is ever written to memory. fp32 accumulation
on the tensor cores; g, the bias and the cast to x's dtype in the epilogue.
Beside it: ``w4_dequantize``, the bandwidth-bound pass that writes the whole weight in 16-bit or
FP8 (what the offered methods multiply with cuBLAS or torch._scaled_mm), by one of two kernels
(DEQUANT_PASS): the interleaving pass or the pair pass, whose byte decode is PTX
(``diffgen_cuda.nibble_decode``); and ``w4_gemv``, the kernel for inputs of a few rows, which reads
the packed weight once.
Importing this module imports Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from diffgen.builtin.fp8_methods import WEIGHT_ONLY_ROWS

from .. import nibble_decode

E2M1, INT4 = 0, 1  # CODES
E4M3, E8M0, FLOAT = 0, 1, 2  # SCALES
GEMV_ROWS = WEIGHT_ONLY_ROWS  # inputs of at most this many rows go to w4_gemv, as FP8's go to fp8_gemv


@triton.jit
def _decode(codes, CODES: tl.constexpr):
    """uint8 codes 0..15 -> fp32 values, in a few integer ops and no int -> float conversion."""
    if CODES == 0:  # E2M1 s|ee|m: the fp32 with bits ee|m at 24..22 is the value times 2^-126 (0.5
        # as the subnormal 2^-127; the GPU's mul.f32 keeps subnormals), sign at 31; times 2^126: exact
        bits = ((codes & 7).to(tl.int32) << 22) | ((codes & 8).to(tl.int32) << 28)
        return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37
    else:  # signed int4: c ^ 8 - 8 sign-extends; added to the bits of 1.5 * 2^23, whose ulp is 1
        bits = (codes ^ 8).to(tl.int32) + (0x4B400000 - 8)
        return bits.to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _scale_to_float(s, SCALES: tl.constexpr):
    if SCALES == 0:  # E4M3, passed as its bytes so masked lanes can read as +0
        return s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif SCALES == 1:  # E8M0: 2^(s - 127), the exponent field of an fp32
        return (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    else:
        return s.to(tl.float32)


@triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
             for bn, bm, bk, w, s in [(128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
                                      (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4)]],
    key=["M_BUCKET", "N", "K"])
@triton.jit
def _w4_gemm_kernel(x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, KP, M_BUCKET,
                    stride_xm, stride_wn, stride_sn, stride_ym,
                    CODES: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Computed transposed, y^T = W x^T: the decoded weight tile is the MMA's first operand, which
    Hopper's wgmma reads from registers, and x^T the second, read from shared memory as loaded. (With
    the decoded tile as the second operand it has to pass through shared memory first: 0.8-1.5x
    this kernel's time at FLUX.1's shapes on an H200, docs/benchmarks/w4_gemm_operand_order_H200.json.)
    Compiled for sm_90a on the CPU (Triton 3.6, its ptxas; see benchmarks/attention_sass.py for the
    method), the k-loop spends about 15 ALU operations per decoded weight (LOP3/IMAD/PRMT/SEL for
    the E2M1 decode, an fp32 FMUL and a pack per value) against 2 * BLOCK_M flops of MMA, so at
    BLOCK_M 128 the decode takes about twice the MMA's time; and ptxas serializes the wgmmas in the
    BLOCK_M 64/128 configs ("non wgmma instructions defining accumulator registers"). Only the
    BLOCK_M 256 config is balanced and unserialized. A cheaper decode is the lever."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # programs of GROUP_M row tiles run together and share weight tiles in L2
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // GROUP)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=mask_m[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        w = _dequantize_tile(w_rows, s_rows, k0, offs_b, offs_g, mask_n, KP, CODES, SCALES, GROUP, BLOCK_N, BLOCK_K)
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
    y = acc * tl.load(g_ptr)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None], y.to(y_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _dequantize_tile(w_rows, s_rows, k0, offs_b, offs_g, mask_n, KP, CODES: tl.constexpr, SCALES: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 [BLOCK_N, BLOCK_K] tile of the weight starting at column k0, without the global scale."""
    packed = tl.load(w_rows + (k0 // 2 + offs_b)[None, :], mask=mask_n[:, None] & ((k0 // 2 + offs_b) < KP // 2)[None, :],
                     other=0)
    codes = tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_N, BLOCK_K])  # low nibble first
    scale = tl.load(s_rows + (k0 // GROUP + offs_g)[None, :],
                    mask=mask_n[:, None] & ((k0 // GROUP + offs_g) < KP // GROUP)[None, :], other=0)
    w = tl.reshape(_decode(codes, CODES), [BLOCK_N, BLOCK_K // GROUP, GROUP])
    return tl.reshape(w * _scale_to_float(scale, SCALES)[:, :, None], [BLOCK_N, BLOCK_K])


@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, g_ptr, r_ptr, y_ptr, N, K, KP, stride_wn, stride_sn, stride_yn,
                       CODES: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    w = _dequantize_tile(w_ptr + rows * stride_wn, s_ptr + rows * stride_sn, k0, tl.arange(0, BLOCK_K // 2),
                         tl.arange(0, BLOCK_K // GROUP), mask_n, KP, CODES, SCALES, GROUP, BLOCK_N, BLOCK_K)
    w = w * tl.load(g_ptr)
    if PER_ROW:  # onto a per-row grid (FP8 output): times 1 / row scale
        w = w * tl.load(r_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(y_ptr + rows * stride_yn + offs_k[None, :], w.to(y_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_k < K)[None, :])


@triton.jit
def _w4_dequant_lowrank_kernel(w_ptr, s_ptr, r_ptr, b_ptr, a_ptr, y_ptr, N, K, KP, stride_wn, stride_sn, stride_yn,
                               stride_bn, stride_ar, CODES: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr,
                               RANK: tl.constexpr, OUT_MAX: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    """``_w4_dequant_kernel`` onto a per-row grid, plus a low-rank product b @ a on the tensor cores
    (b [N, RANK] already on the row grid, a [RANK, K]), clamped to +-OUT_MAX before the cast."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    w = _dequantize_tile(w_ptr + rows * stride_wn, s_ptr + rows * stride_sn, k0, tl.arange(0, BLOCK_K // 2),
                         tl.arange(0, BLOCK_K // GROUP), mask_n, KP, CODES, SCALES, GROUP, BLOCK_N, BLOCK_K)
    w = w * tl.load(r_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    offs_r = tl.arange(0, RANK)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    b = tl.load(b_ptr + rows * stride_bn + offs_r[None, :], mask=mask_n[:, None], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * stride_ar + offs_k[None, :], mask=(offs_k < K)[None, :],
                other=0.0)
    w = tl.dot(b, a, w)
    w = tl.minimum(tl.maximum(w, -OUT_MAX, propagate_nan=tl.PropagateNan.ALL), OUT_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + rows * stride_yn + offs_k[None, :], w.to(y_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_k < K)[None, :])


# The pair pass's byte decode as PTX (diffgen_cuda.nibble_decode); Triton's CPU interpreter runs
# the same arithmetic written in Triton instead.
_E2M1_PTX = tl.constexpr(nibble_decode.ptx(E2M1))
_INT4_PTX = tl.constexpr(nibble_decode.ptx(INT4))
_DECODE_CONSTRAINTS = tl.constexpr(nibble_decode.CONSTRAINTS)
_SPREAD_E2M1, _SPREAD_INT4 = tl.constexpr(nibble_decode.SPREAD[E2M1]), tl.constexpr(nibble_decode.SPREAD[INT4])
_NIBBLES_E2M1, _NIBBLES_INT4 = tl.constexpr(nibble_decode.NIBBLES[E2M1]), tl.constexpr(nibble_decode.NIBBLES[INT4])
_SIGNS, _INT4_BIAS = tl.constexpr(nibble_decode.SIGNS), tl.constexpr(nibble_decode.INT4_BIAS)
_PER_E2M1_UNIT = tl.constexpr(1 / nibble_decode.UNIT[E2M1])
PTX = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@triton.jit
def _byte_values(packed, f, row, CODES: tl.constexpr, USE_PTX: tl.constexpr):
    """(low nibble, high nibble) of each byte as fp32, (code * UNIT * f) * row."""
    if USE_PTX:
        if CODES == 0:
            return tl.inline_asm_elementwise(_E2M1_PTX, _DECODE_CONSTRAINTS, [packed, f, row],
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_INT4_PTX, _DECODE_CONSTRAINTS, [packed, f, row],
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    else:
        if CODES == 0:
            t = packed.to(tl.int32) * _SPREAD_E2M1
            word = (t & _NIBBLES_E2M1) + 7 * (t & _SIGNS)
        else:
            t = packed.to(tl.int32) * _SPREAD_INT4
            word = (t & _NIBBLES_INT4) ^ _INT4_BIAS
        lo = (word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((word >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        if CODES == 1:
            lo, hi = lo - 1032.0, hi - 1032.0
        return lo * f * row, hi * f * row


@triton.jit
def _pair_word(lo, hi, OUT: tl.constexpr, USE_PTX: tl.constexpr):
    """Both values rounded to the output type (round to nearest even) in one word, the low one
    (the lower address on a little-endian GPU) in the low half. OUT: 0 bf16, 1 fp16, 2 E4M3."""
    if USE_PTX:  # one paired conversion; its first operand goes to the upper half
        if OUT == 0:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.uint32,
                                             is_pure=True, pack=1)
        elif OUT == 1:
            return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.uint32,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,f,f", [lo, hi],
                                             dtype=tl.uint16, is_pure=True, pack=1)
    else:
        if OUT == 2:
            a = lo.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.uint16)
            return a | (hi.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.uint16) << 8)
        else:
            out: tl.constexpr = tl.bfloat16 if OUT == 0 else tl.float16
            a = lo.to(out).to(tl.uint16, bitcast=True).to(tl.uint32)
            return a | (hi.to(out).to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def _w4_dequant_pairs_kernel(w_ptr, s_ptr, g_ptr, r_ptr, y_ptr, N, HALF_K, KP, stride_wn, stride_sn, stride_yn,
                             CODES: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr,
                             PER_ROW: tl.constexpr, OUT: tl.constexpr, USE_PTX: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The pair pass: each packed byte becomes both its values, stored as one word (OUT 0/1/2:
    y_ptr is the output viewed as 32-bit words for bf16/fp16 or 16-bit for E4M3, ``stride_yn`` in
    words; 3: fp32, the two values stored apart). The tile is [rows, groups, bytes of a group], so
    each thread's bytes share one block scale without any layout conversion, and the decode is
    ``nibble_decode``'s PTX: 8.2 instructions per weight into bf16 in the sm_90a SASS (12 per byte
    in the decode and the two products; loads, masks and the scale conversion the rest) against the
    interleaving pass's 14.5, and 3 barriers per program against 33 (Triton 3.6, 64 x 256 tiles;
    benchmarks/w4_sass.py)."""
    G: tl.constexpr = BLOCK_K // GROUP
    H: tl.constexpr = GROUP // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = offs_n[:, None, None]
    g3 = (tl.program_id(1) * G + tl.arange(0, G))[None, :, None]
    cols = g3 * H + tl.arange(0, H)[None, None, :]  # byte columns, output pairs
    rows = n3.to(tl.int64)
    in_group = (n3 < N) & (g3 < KP // GROUP)
    packed = tl.load(w_ptr + rows * stride_wn + cols, mask=in_group, other=0)
    f = _scale_to_float(tl.load(s_ptr + rows * stride_sn + g3, mask=in_group, other=0), SCALES)
    if CODES == 0:
        f = f * _PER_E2M1_UNIT  # the decode's values are the codes times 2^-14
    row = tl.zeros([BLOCK_N, 1, 1], dtype=tl.float32) + tl.load(g_ptr)
    if PER_ROW:  # the global scale is one wherever a row factor is passed: one product either way
        row = row * tl.load(r_ptr + n3, mask=n3 < N, other=0.0)
    lo, hi = _byte_values(packed, tl.broadcast_to(f, [BLOCK_N, G, H]), tl.broadcast_to(row, [BLOCK_N, G, H]),
                          CODES, USE_PTX)
    mask = (n3 < N) & (cols < HALF_K)
    if OUT == 3:
        out = y_ptr + rows * stride_yn + 2 * cols
        tl.store(out, lo, mask=mask)
        tl.store(out + 1, hi, mask=mask)
    else:
        tl.store(y_ptr + rows * stride_yn + cols, _pair_word(lo, hi, OUT, USE_PTX), mask=mask)


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bn, bk, w, s in [(16, 1024, 4, 3), (32, 512, 4, 3), (8, 2048, 4, 3), (64, 256, 4, 3),
                                  (16, 512, 4, 4), (32, 256, 2, 4)]],
    key=["M", "N", "K"])
@triton.jit
def _w4_gemv_kernel(x_ptr, w_ptr, s_ptr, g_ptr, r_ptr, b_ptr, y_ptr, M, N, K, KP, stride_xm, stride_wn, stride_sn,
                    stride_ym, CODES: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr,
                    PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A few rows (the modulation linears' one row per sample), on the CUDA cores in fp32: each
    program reads its [BLOCK_N, Kp/2] slice of the packed weight once, so the time is that of
    reading 4.5 bits per weight. The low and the high nibbles are decoded as two tiles and meet
    the even and the odd inputs (no interleaving of the tile in registers), each byte's scale
    gathered by its group."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    offs_b = tl.arange(0, BLOCK_K // 2)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in range(0, KP // 2, BLOCK_K // 2):
        cols = b0 + offs_b  # byte columns: inputs 2 * cols (low nibble) and 2 * cols + 1 (high)
        mask_w = mask_n[:, None] & (cols < KP // 2)[None, :]
        packed = tl.load(w_rows + cols[None, :], mask=mask_w, other=0)
        scale = _scale_to_float(tl.load(s_rows + (cols // (GROUP // 2))[None, :], mask=mask_w, other=0), SCALES)
        lo = _decode(packed & 15, CODES) * scale
        hi = _decode(packed >> 4, CODES) * scale
        for i in tl.static_range(BLOCK_M):  # one input row at a time: the decoded tiles serve each
            x_lo = tl.load(x_ptr + i * stride_xm + 2 * cols, mask=(i < M) & (2 * cols < K),
                           other=0.0).to(tl.float32)  # the padded inputs (K < Kp) read as 0
            x_hi = tl.load(x_ptr + i * stride_xm + 2 * cols + 1, mask=(i < M) & (2 * cols + 1 < K),
                           other=0.0).to(tl.float32)
            part = tl.sum(lo * x_lo[None, :] + hi * x_hi[None, :], axis=1)
            acc = tl.where(offs_m[:, None] == i, acc + part[None, :], acc)
    y = acc * tl.load(g_ptr)
    if PER_ROW:
        y = y * tl.load(r_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor):
    """(x with a unit inner stride, the scale as bytes where it is E4M3, the empty [M, N] output)."""
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, scale, torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


def w4_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
            row_factor: torch.Tensor | None, bias: torch.Tensor | None, *, codes: int = E2M1, scales: int = E4M3,
            group: int = 16, kernel=_w4_gemv_kernel) -> torch.Tensor:
    """y = x @ W^T (times ``row_factor`` [N] per output, where given) + bias for x [M, K] 16-bit
    with M <= GEMV_ROWS; W as in ``w4a16_gemm``. Returns [M, N] in x's dtype."""
    m, k = x.shape
    n, kp = weight.shape[0], 2 * weight.shape[1]
    if m > GEMV_ROWS:
        raise ValueError(f"w4_gemv takes at most {GEMV_ROWS} rows, got {m}")
    x, scale, y = _operands(x, weight, scale)
    if m == 0:
        return y

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](x, weight, scale, global_scale, row_factor if row_factor is not None else global_scale,
                 bias if bias is not None else y, y, m, n, k, kp, x.stride(0), weight.stride(0), scale.stride(0),
                 y.stride(0), CODES=codes, SCALES=scales, GROUP=group, PER_ROW=row_factor is not None,
                 HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m))
    return y


# Which pass w4_dequantize runs: "tiles" (the interleaving pass, measured) or "pairs" (the pair pass,
# leaner in the SASS, not yet measured on a GPU; benchmarks/w4_dequant.py times both).
DEQUANT_PASS = "tiles"
PAIRS_TILE = (64, 256, 4)  # rows, weights per row, warps: 40 registers, 8.2 SASS instructions per weight
_PAIR_OUT = {torch.bfloat16: (0, torch.int32), torch.float16: (1, torch.int32), torch.float8_e4m3fn: (2, torch.int16),
             torch.float32: (3, torch.float32)}


def w4_dequantize(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, k: int,
                  dtype: torch.dtype, row_inverse: torch.Tensor | None = None, *, codes: int = E2M1,
                  scales: int = E4M3, group: int = 16, wrap=None, kind: str | None = None,
                  tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The whole [N, k] weight in ``dtype``, in one bandwidth-bound pass (``nvfp4-triton-dequant``
    writes it for one GEMM and drops it; the GEMM kernel above never writes it). ``row_inverse``
    [N] multiplies each row on the way (1 / the per-row scale of an FP8 output; the callers then
    pass a global scale of one). ``kind`` picks the pass (DEQUANT_PASS by default), ``tile`` the
    pair pass's (rows, weights, warps), ``wrap`` is torch.library.wrap_triton inside an operator."""
    n, kp = weight.shape[0], 2 * weight.shape[1]
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    row = row_inverse if row_inverse is not None else global_scale
    wrap = wrap or (lambda kernel: kernel)
    if (kind or DEQUANT_PASS) == "pairs":
        block_n, block_k, warps = tile or PAIRS_TILE
        out, word = _PAIR_OUT[dtype]
        y = torch.empty((n, k + k % 2), dtype=dtype, device=weight.device)  # an even row: whole words
        words = y.view(word)
        grid = (triton.cdiv(n, block_n), triton.cdiv(kp, block_k))
        wrap(_w4_dequant_pairs_kernel)[grid](
            weight, scale, global_scale, row, words, n, (k + 1) // 2, kp, weight.stride(0), scale.stride(0),
            words.stride(0), CODES=codes, SCALES=scales, GROUP=group, PER_ROW=row_inverse is not None, OUT=out,
            USE_PTX=PTX, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
        return y if k % 2 == 0 else y[:, :k].contiguous()
    y = torch.empty((n, k), dtype=dtype, device=weight.device)
    # 64 x 256 tiles: 1.8-3.2 TB/s into bf16 and 1.0-2.4 TB/s into FP8 at FLUX.1's shapes on an H200
    # (benchmarks/w4_dequant.py, docs/benchmarks/w4_dequant_H200.json), ahead of every tile of a pass
    # that stores each packed byte's two outputs as one word (measured at 5953f0c, then removed; its
    # decode was Triton's, about 17 instructions per weight in the SASS)
    grid = (triton.cdiv(n, 64), triton.cdiv(kp, 256))
    wrap(_w4_dequant_kernel)[grid](weight, scale, global_scale, row, y, n, k, kp, weight.stride(0), scale.stride(0),
                                   y.stride(0), CODES=codes, SCALES=scales, GROUP=group,
                                   PER_ROW=row_inverse is not None, BLOCK_N=64, BLOCK_K=256, num_warps=4)
    return y


def w4_dequantize_lowrank(weight: torch.Tensor, scale: torch.Tensor, k: int, row_inverse: torch.Tensor,
                          lowrank_b: torch.Tensor, lowrank_a: torch.Tensor, *, codes: int = E2M1,
                          scales: int = E4M3, group: int = 16, wrap=None,
                          tile: tuple[int, int, int] = (64, 256, 4)) -> torch.Tensor:
    """The [N, k] FP8 weight (code * block scale * ``row_inverse`` [N]) + ``lowrank_b`` [N, R] @
    ``lowrank_a`` [R, k] (both 16-bit, R a power of two >= 16, b already on the row grid), in one
    pass: a low-rank branch folded into the weight the FP8 GEMM reads (``nvfp4_w4a8``). ``tile``:
    (rows, weights per row, warps); compiled for sm_90a, 64 x 256 with 4 warps holds 168 registers
    and 64 x 128 holds 96 (docs/benchmarks/w4_dequant_sass_sm90.json); neither is timed yet."""
    n, kp = weight.shape[0], 2 * weight.shape[1]
    rank = lowrank_a.shape[0]
    if lowrank_b.shape != (n, rank) or lowrank_a.shape[1] != k or rank < 16 or rank & (rank - 1):
        raise ValueError(f"w4_dequantize_lowrank: b {tuple(lowrank_b.shape)} and a {tuple(lowrank_a.shape)} are not "
                         f"[{n}, R] and [R, {k}] with R a power of two >= 16")
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    y = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=weight.device)
    block_n, block_k, warps = tile
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp, block_k))
    (wrap or (lambda kernel: kernel))(_w4_dequant_lowrank_kernel)[grid](
        weight, scale, row_inverse, lowrank_b, lowrank_a, y, n, k, kp, weight.stride(0), scale.stride(0), y.stride(0),
        lowrank_b.stride(0), lowrank_a.stride(0), CODES=codes, SCALES=scales, GROUP=group, RANK=rank,
        OUT_MAX=float(torch.finfo(torch.float8_e4m3fn).max), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def _launch(kernel, x, weight, scale, global_scale, bias, codes: int, scales: int, group: int) -> torch.Tensor:
    m, k = x.shape
    n, kp = weight.shape[0], 2 * weight.shape[1]
    x, scale, y = _operands(x, weight, scale)
    if m == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](x, weight, scale, global_scale, bias if bias is not None else y, y, m, n, k, kp,
                 min(triton.next_power_of_2(m), 4096), x.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
                 CODES=codes, SCALES=scales, GROUP=group, HAS_BIAS=bias is not None)
    return y


def w4a16_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
               bias: torch.Tensor | None, *, codes: int = E2M1, scales: int = E4M3, group: int = 16) -> torch.Tensor:
    """x [M, K] bf16/fp16; weight [N, Kp/2] uint8; scale [N, Kp/group]; global_scale fp32 (); bias
    [N] or None. Returns [M, N] in x's dtype."""
    return _launch(_w4_gemm_kernel, x, weight, scale, global_scale, bias, codes, scales, group)


# The same as an operator torch.compile places in a graph (torch >= 2.6); None on older torch.
if hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("diffgen_cuda::w4a16_gemm", mutates_args=())
    def _w4a16_gemm_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                       bias: torch.Tensor | None, codes: int, scales: int, group: int) -> torch.Tensor:
        return _launch(torch.library.wrap_triton(_w4_gemm_kernel), x, weight, scale, global_scale, bias,
                       codes, scales, group)

    @torch.library.triton_op("diffgen_cuda::w4_dequantize", mutates_args=())
    def _w4_dequantize_op(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, k: int,
                          dtype: torch.dtype, row_inverse: torch.Tensor | None, codes: int = E2M1,
                          scales: int = E4M3, group: int = 16) -> torch.Tensor:
        return w4_dequantize(weight, scale, global_scale, k, dtype, row_inverse, codes=codes, scales=scales,
                             group=group, wrap=torch.library.wrap_triton)

    @torch.library.triton_op("diffgen_cuda::w4_gemv", mutates_args=())
    def _w4_gemv_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                    row_factor: torch.Tensor | None, bias: torch.Tensor | None, codes: int = E2M1,
                    scales: int = E4M3, group: int = 16) -> torch.Tensor:
        return w4_gemv(x, weight, scale, global_scale, row_factor, bias, codes=codes, scales=scales, group=group,
                       kernel=torch.library.wrap_triton(_w4_gemv_kernel))

    @torch.library.triton_op("diffgen_cuda::w4_dequantize_lowrank", mutates_args=())
    def _w4_dequantize_lowrank_op(weight: torch.Tensor, scale: torch.Tensor, k: int, row_inverse: torch.Tensor,
                                  lowrank_b: torch.Tensor, lowrank_a: torch.Tensor) -> torch.Tensor:
        return w4_dequantize_lowrank(weight, scale, k, row_inverse, lowrank_b, lowrank_a,
                                     wrap=torch.library.wrap_triton)

    w4a16_gemm_op = torch.ops.diffgen_cuda.w4a16_gemm
    w4_dequantize_op = torch.ops.diffgen_cuda.w4_dequantize
    w4_gemv_op = torch.ops.diffgen_cuda.w4_gemv
    w4_dequantize_lowrank_op = torch.ops.diffgen_cuda.w4_dequantize_lowrank
else:
    w4a16_gemm_op = w4_dequantize_op = w4_gemv_op = w4_dequantize_lowrank_op = None
