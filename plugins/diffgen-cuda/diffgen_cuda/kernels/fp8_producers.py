"""The op before an FP8 linear and the quantization of its output, in one pass (Triton).

  norm_modulate_quant(x [B, S, K], shift [B, K], scale [B, K])
      y = LayerNorm(x) * (1 + scale) + shift            (LayerNorm without affine, eps given)
  gelu_concat_quant(a [.., Ka] or None, h [.., Kh])
      y = cat([a, gelu_tanh(h)], -1)
then q = sat(y * (1 / input_scale)) (static), or s = max(amax(|y_row|), 1e-12) / 448,
q = sat(y * (1 / s)) (per token), the definitions of fp8_quant.py. x (or a, h) is read once and q
written once: a row stays in registers where its sum or amax is needed (LayerNorm, per-token
scales), and static GELU + concat runs in blocks of columns. The bf16 y of LayerNorm + modulation is
written too when a 16-bit linear also reads it.

The eager PyTorch ops these replace round each intermediate to bf16 (LayerNorm's output, 1 + scale,
the product, the sum, GELU's output); the kernels round at the same points, so y matches them but
for the reduction order of LayerNorm's mean and variance and GELU's form (see the kernel), which
can move a value by one bf16 step, and so rarely one FP8 step (the GPU tests bound both).
The rounding is done on the bits (_round_to_bf16): written as .to(bfloat16).to(float32), Triton
3.6 dropped it between the product and the sum and fused the two into one FMA, which changed 28%
of the outputs by a bf16 step on an H100. Activations must be bf16 (diffgen_cuda.fused checks).
Used by the FLUX.1 rewrites (diffgen_cuda.flux1) through diffgen_cuda.fused's prepared-input methods.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .fp8_quant import _AMAX_EPS, _fp8_max, saturate


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32; inf and NaN pass through."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # a NaN's payload may be in the low bits


@triton.jit
def _quantize_row(y, mask, q_row_ptr, s_ptr, row, in_scale_ptr, STATIC: tl.constexpr, FP8_MAX: tl.constexpr,
                  EPS: tl.constexpr):
    if STATIC:
        s = tl.load(in_scale_ptr)
    else:
        s = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), EPS) * (1.0 / FP8_MAX)
        tl.store(s_ptr + row, s)
    q = y * tl.math.div_rn(1.0, s)
    return saturate(q, FP8_MAX).to(q_row_ptr.dtype.element_ty)


@triton.jit
def _norm_modulate_quant_kernel(x_ptr, shift_ptr, scale_ptr, y_ptr, q_ptr, s_ptr, in_scale_ptr, k, rows_per_batch,
                                stride_x, stride_shift, stride_scale, eps, STATIC: tl.constexpr, WRITE_Y: tl.constexpr,
                                FP8_MAX: tl.constexpr, EPS: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    offs = tl.arange(0, BLOCK_K)
    mask = offs < k
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / k
    centred = tl.where(mask, x - mean, 0.0)
    rstd = libdevice.rsqrt(tl.sum(centred * centred, axis=0) / k + eps)
    normed = _round_to_bf16(centred * rstd)
    scale = tl.load(scale_ptr + batch * stride_scale + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + batch * stride_shift + offs, mask=mask, other=0.0).to(tl.float32)
    y = _round_to_bf16(_round_to_bf16(normed * _round_to_bf16(1.0 + scale)) + shift)
    if WRITE_Y:
        tl.store(y_ptr + row * k + offs, y.to(tl.bfloat16), mask=mask)
    q = _quantize_row(y, mask, q_ptr + row * k, s_ptr, row, in_scale_ptr, STATIC, FP8_MAX, EPS)
    tl.store(q_ptr + row * k + offs, q, mask=mask)


@triton.jit
def _gelu_concat_quant_kernel(a_ptr, h_ptr, q_ptr, s_ptr, in_scale_ptr, ka, kh, stride_a, stride_h,
                              STATIC: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr,
                              BLOCK: tl.constexpr):
    # Program (row, j) takes columns [j * BLOCK, (j + 1) * BLOCK) of the concatenated row; with
    # per-token scales one block spans the whole row (its amax is needed before any q).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k = ka + kh
    in_a = cols < ka
    in_row = cols < k
    a = tl.load(a_ptr + row * stride_a + cols, mask=in_a, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row * stride_h + (cols - ka), mask=in_row & ~in_a, other=0.0).to(tl.float32)
    # PyTorch's tanh GELU, 0.5 * h * (1 + tanh(u)) with u = sqrt(2/pi) * (h + 0.044715 * h^3), as
    # h * sigmoid(2u) = h / (1 + exp(-2u)): the same function without libdevice's tanh, whose cost
    # made this kernel compute-bound. The two differ by a few fp32 ulps, below the bf16 rounding
    # that follows but for rare ties.
    u = 0.7978845608028654 * (h + 0.044715 * (h * h * h))
    g = _round_to_bf16(h / (1.0 + tl.exp(-2.0 * u)))
    y = tl.where(in_a, a, g)
    q = _quantize_row(y, in_row, q_ptr + row * k, s_ptr, row, in_scale_ptr, STATIC, FP8_MAX, EPS)
    tl.store(q_ptr + row * k + cols, q, mask=in_row)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _outputs(rows: int, k: int, dtype: torch.dtype, device, static: bool):
    q = torch.empty((rows, k), dtype=dtype, device=device)
    s = None if static else torch.empty((rows, 1), dtype=torch.float32, device=device)
    return q, s


def norm_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                        input_scale: torch.Tensor | None, dtype: torch.dtype, keep_value: bool):
    """((q [B*S, K], input_scale or s [B*S, 1]), y [B, S, K] or None). Static when input_scale is given."""
    b, seq, k = x.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if shift.stride(-1) != 1 or scale.stride(-1) != 1:  # [B, K] chunks of the modulation output
        shift, scale = shift.contiguous(), scale.contiguous()
    static = input_scale is not None
    q, s = _outputs(x2.shape[0], k, dtype, x.device, static)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if keep_value else None
    block = triton.next_power_of_2(k)
    if x2.shape[0]:
        _norm_modulate_quant_kernel[(x2.shape[0],)](
            x2, shift, scale, x2 if y is None else y, q, q if s is None else s,
            q if input_scale is None else input_scale,
            k, seq, x2.stride(0), shift.stride(0), scale.stride(0), eps, STATIC=static, WRITE_Y=keep_value,
            FP8_MAX=_fp8_max(dtype), EPS=_AMAX_EPS, BLOCK_K=block, num_warps=_warps(block))
    return (q, input_scale if static else s), y


def gelu_concat_quant(a: torch.Tensor | None, h: torch.Tensor, input_scale: torch.Tensor | None,
                      dtype: torch.dtype):
    """(q [M, Ka + Kh], input_scale or s [M, 1]) of cat([a, gelu_tanh(h)], -1)."""
    q, s = _gelu_concat(a, h, input_scale, dtype, _gelu_concat_quant_kernel)
    return q, input_scale if input_scale is not None else s


def _gelu_concat(a, h, input_scale, dtype, kernel) -> tuple[torch.Tensor, torch.Tensor]:
    kh = h.shape[-1]
    h2 = h.reshape(-1, kh)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    a2 = None
    if a is not None:
        a2 = a.reshape(-1, a.shape[-1])
        if a2.stride(-1) != 1:
            a2 = a2.contiguous()
    ka = 0 if a2 is None else a2.shape[1]
    static = input_scale is not None
    rows = h2.shape[0]
    q = torch.empty((rows, ka + kh), dtype=dtype, device=h.device)
    s = torch.empty((0 if static else rows, 1), dtype=torch.float32, device=h.device)
    # Static scales need no row reduction: blocks of 1024 columns, many programs per row.
    block = 1024 if static else triton.next_power_of_2(ka + kh)
    if rows:
        kernel[(rows, triton.cdiv(ka + kh, block))](
            h2 if a2 is None else a2, h2, q, q if static else s, q if input_scale is None else input_scale,
            ka, kh, 0 if a2 is None else a2.stride(0), h2.stride(0), STATIC=static,
            FP8_MAX=_fp8_max(dtype), EPS=_AMAX_EPS, BLOCK=block, num_warps=_warps(block))
    return q, s


# GELU + concat + quantization as an operator torch.compile can place in a graph (torch >= 2.6): compiled
# FLUX.1 blocks call it too (diffgen_cuda.fused), because Inductor's own fusion of the same ops is
# slower (a row's amax over 15360 columns in a separate pass); None on older torch. For static scales
# the second output is empty.
if hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("diffgen_cuda::gelu_concat_quant", mutates_args=())
    def _gelu_concat_op(a: torch.Tensor | None, h: torch.Tensor, input_scale: torch.Tensor | None,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return _gelu_concat(a, h, input_scale, dtype, torch.library.wrap_triton(_gelu_concat_quant_kernel))

    gelu_concat_quant_op = torch.ops.diffgen_cuda.gelu_concat_quant
else:
    gelu_concat_quant_op = None
