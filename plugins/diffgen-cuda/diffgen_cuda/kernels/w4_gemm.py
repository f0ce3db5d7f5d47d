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

The dequantize passes write the whole weight instead (W = code * s * g [* r per row], one rounding
to bf16/fp16/FP8/fp32) for cuBLAS or torch._scaled_mm: ``_w4_dequant_pairs_kernel`` decodes each
packed byte's two codes in place and stores them as one word (the default); ``_w4_dequant_kernel``
interleaves the two nibble tensors (tl.join + reshape) and is the fallback for odd widths. Both
compute the same products in the same order, so they write the same bits. ``w4_linear_chunked``
multiplies a few MB of the weight at a time so that the written chunk stays in L2.
Importing this module imports Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

E2M1, INT4 = 0, 1  # CODES
E4M3, E8M0, FLOAT = 0, 1, 2  # SCALES


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
             for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
                                      (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (16, 128, 128, 4, 4)]],
    key=["M_BUCKET", "N", "K"])
@triton.jit
def _w4_gemm_kernel(x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, KP, M_BUCKET,
                    stride_xm, stride_wn, stride_sn, stride_ym,
                    CODES: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=mask_m[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        w = _dequantize_tile(w_rows, s_rows, k0, offs_b, offs_g, mask_n, KP, CODES, SCALES, GROUP, BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    y = acc * tl.load(g_ptr)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


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
def _w4_dequant_pairs_kernel(w_ptr, s_ptr, g_ptr, r_ptr, y_ptr, N, HALF_K, stride_wn, stride_sn, stride_yp,
                             CODES: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                             OUT_BITS: tl.constexpr, CVT_X2: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_B: tl.constexpr):
    """Byte b of a row holds elements 2b (low nibble) and 2b + 1: both are decoded in place (no
    interleaving of the two nibble tensors) and stored as one 2 * OUT_BITS word through a view of
    the output whose low half, on a little-endian GPU, is the lower address, element 2b;
    ``stride_yp`` counts those words. The program's tile is BLOCK_N rows x BLOCK_B bytes."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # 16 output bytes per thread and store: as many packed bytes per load, so that the loads and the
    # stores share one register layout (no conversion through shared memory between them)
    offs_b = tl.max_contiguous(tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B), 64 // OUT_BITS)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_b < HALF_K)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    packed = tl.load(w_ptr + rows * stride_wn + offs_b[None, :], mask=mask, other=0)
    # both elements of byte b are in group b // (GROUP / 2), the same for each thread's bytes.
    # Loaded per byte (from L1: a warp's loads fall in one or two sectors), as tiles of [rows,
    # groups] broadcast onto the bytes cost layout conversions through shared memory, which is what
    # held the interleaving pass back
    group_of = tl.max_constancy(offs_b // (GROUP // 2), 64 // OUT_BITS)
    scale = tl.load(s_ptr + rows * stride_sn + group_of[None, :], mask=mask, other=0)
    scale = _scale_to_float(scale, SCALES)
    # the products in the order of _w4_dequant_kernel, so both write the same bits
    g = tl.load(g_ptr)
    lo = _decode(packed & 15, CODES) * scale * g
    hi = _decode(packed >> 4, CODES) * scale * g
    if PER_ROW:
        r = tl.load(r_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        lo, hi = lo * r, hi * r
    out = y_ptr.dtype.element_ty
    if OUT_BITS == 8:
        if CVT_X2:  # PTX's paired conversion: the first operand to the upper half, round to nearest even
            word = tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,f,f", [lo, hi],
                                             dtype=tl.uint16, is_pure=True, pack=1)
        else:
            lo, hi = lo.to(out).to(tl.uint8, bitcast=True), hi.to(out).to(tl.uint8, bitcast=True)
            word = lo.to(tl.uint16) | (hi.to(tl.uint16) << 8)
        pairs = y_ptr.to(tl.pointer_type(tl.uint16))
    elif OUT_BITS == 16:
        if CVT_X2:
            word = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;" if out == tl.bfloat16 else
                                             "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.uint32,
                                             is_pure=True, pack=1)
        else:
            lo, hi = lo.to(out).to(tl.uint16, bitcast=True), hi.to(out).to(tl.uint16, bitcast=True)
            word = lo.to(tl.uint32) | (hi.to(tl.uint32) << 16)
        pairs = y_ptr.to(tl.pointer_type(tl.uint32))
    else:
        lo, hi = lo.to(tl.uint32, bitcast=True), hi.to(tl.uint32, bitcast=True)
        word = lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)
        pairs = y_ptr.to(tl.pointer_type(tl.uint64))
    tl.store(pairs + rows * stride_yp + offs_b[None, :], word, mask=mask)


# Round each pair with one paired PTX conversion (cvt.rn.*x2.f32: the same rounding as Triton's
# casts, one instruction instead of two conversions and a merge); not in Triton's CPU interpreter.
CVT_X2 = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# The pair kernel's tile (rows, bytes, warps); benchmarks/w4_dequant.py measures the alternatives.
PAIRS_TILE = (16, 512, 4)
# The interleaving kernel's tile: 1.0-1.9 TB/s at FLUX.1's shapes on an H200, 1.2-1.5x the 32 x 256
# tiles it had (docs/benchmarks/w4_dequant_H200.json); now the fallback for odd K.
TILES_TILE = (64, 256, 4)
_OUT_BITS = {torch.float8_e4m3fn: 8, torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}


def w4_dequantize_into(y: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                       row_inverse: torch.Tensor | None = None, *, codes: int = E2M1, scales: int = E4M3,
                       group: int = 16, kernel: str = "pairs", tile: tuple[int, int, int] | None = None,
                       wrap=None) -> torch.Tensor:
    """Writes the [N, k] weight into ``y`` (k = y.shape[1], rows contiguous) and returns it.
    ``kernel`` "pairs" (the byte-pair pass; odd k falls back) or "tiles" (the interleaving pass);
    ``wrap`` is torch.library.wrap_triton inside a triton_op."""
    n, kp, k = weight.shape[0], 2 * weight.shape[1], y.shape[1]
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    row = row_inverse if row_inverse is not None else global_scale
    # the word view needs an even row length, row stride and start
    pairs = k % 2 == 0 and y.stride(0) % 2 == 0 and y.storage_offset() % 2 == 0 and y.dtype in _OUT_BITS
    if kernel == "pairs" and pairs:
        block_n, block_b, warps = tile or PAIRS_TILE
        launch = (wrap or (lambda f: f))(_w4_dequant_pairs_kernel)
        launch[(triton.cdiv(n, block_n), triton.cdiv(k // 2, block_b))](
            weight, scale, global_scale, row, y, n, k // 2, weight.stride(0), scale.stride(0), y.stride(0) // 2,
            CODES=codes, SCALES=scales, GROUP=group, PER_ROW=row_inverse is not None, OUT_BITS=_OUT_BITS[y.dtype],
            CVT_X2=CVT_X2, BLOCK_N=block_n, BLOCK_B=block_b, num_warps=warps)
        return y
    block_n, block_k, warps = tile if kernel == "tiles" and tile else TILES_TILE
    launch = (wrap or (lambda f: f))(_w4_dequant_kernel)
    launch[(triton.cdiv(n, block_n), triton.cdiv(kp, block_k))](
        weight, scale, global_scale, row, y, n, k, kp, weight.stride(0), scale.stride(0), y.stride(0),
        CODES=codes, SCALES=scales, GROUP=group, PER_ROW=row_inverse is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps)
    return y


def w4_dequantize(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, k: int,
                  dtype: torch.dtype, row_inverse: torch.Tensor | None = None, *, codes: int = E2M1,
                  scales: int = E4M3, group: int = 16, kernel: str = "pairs", wrap=None) -> torch.Tensor:
    """The whole [N, k] weight in ``dtype``, in one bandwidth-bound pass (``nvfp4-triton-dequant``
    writes it for one GEMM and drops it; the GEMM kernel above never writes it). ``row_inverse``
    [N] multiplies each row on the way (1 / the per-row scale of an FP8 output)."""
    y = torch.empty((weight.shape[0], k), dtype=dtype, device=weight.device)
    return w4_dequantize_into(y, weight, scale, global_scale, row_inverse, codes=codes, scales=scales,
                              group=group, kernel=kernel, wrap=wrap)


def w4_linear_chunked(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                      bias: torch.Tensor | None, k: int, *, codes: int = E2M1, scales: int = E4M3, group: int = 16,
                      chunk_rows: int = 1024) -> torch.Tensor:
    """Weight-only y = x @ W^T + b (x [M, k] 2-D) with W dequantized ``chunk_rows`` output rows at a
    time into one reused buffer, each chunk's cuBLAS GEMM right after its pass, writing its columns
    of y in place: the buffer (a few MB) stays in the GPU's L2 cache, so its writes need not reach
    HBM; x is read once per chunk instead."""
    n = weight.shape[0]
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    rows = max(1, min(chunk_rows, n))
    buffer = torch.empty((rows, k), dtype=x.dtype, device=x.device)
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        w = w4_dequantize_into(buffer[: n1 - n0], weight[n0:n1], scale[n0:n1], global_scale, codes=codes,
                               scales=scales, group=group)
        if bias is None:
            torch.mm(x, w.t(), out=y[:, n0:n1])  # a row-strided output: cuBLAS writes it with ldc = N
        else:
            torch.addmm(bias[n0:n1], x, w.t(), out=y[:, n0:n1])
    return y


def _launch(kernel, x, weight, scale, global_scale, bias, codes: int, scales: int, group: int) -> torch.Tensor:
    m, k = x.shape
    n, kp = weight.shape[0], 2 * weight.shape[1]
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
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

    # opaque to Inductor (its in-place writes into views of y would become copies in a graph)
    @torch.library.custom_op("diffgen_cuda::w4_linear_chunked", mutates_args=())
    def _w4_linear_chunked_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                              bias: torch.Tensor | None, k: int, codes: int, scales: int, group: int,
                              chunk_rows: int) -> torch.Tensor:
        return w4_linear_chunked(x, weight, scale, global_scale, bias, k, codes=codes, scales=scales, group=group,
                                 chunk_rows=chunk_rows)

    @_w4_linear_chunked_op.register_fake
    def _(x, weight, scale, global_scale, bias, k, codes, scales, group, chunk_rows):
        return x.new_empty((x.shape[0], weight.shape[0]))

    w4a16_gemm_op = torch.ops.diffgen_cuda.w4a16_gemm
    w4_dequantize_op = torch.ops.diffgen_cuda.w4_dequantize
    w4_linear_chunked_op = torch.ops.diffgen_cuda.w4_linear_chunked
else:
    w4a16_gemm_op = w4_dequantize_op = w4_linear_chunked_op = None
