"""FP8 linear for one-row inputs: activation quantization and the GEMV in one kernel.

  y[m, n] = (sum_k q(x)[m, k] * W[n, k]) * s_x[m] * s_w[n] + b[n]

with q(x) rounded to FP8: sat(x * (1 / s_x)) for a static input scale s_x or for the row's
s_x = max(amax(|x_m|), 1e-12) / 448 (diffgen.numerics.fp8's activation rules); s_w per tensor
or per output channel. The same numbers as quantize + torch._scaled_mm, accumulated in fp32.
Diffusion transformers run their modulation linears (FLUX's norm1.linear: 3072 -> 18432 on the
timestep embedding) with M = 1 (M = 2 with classifier-free guidance batched), where a GEMM is bound
by reading the weight; this kernel streams the FP8 weight once per row (2.6-3.4 TB/s on an H100)
with the activation quantized on the way.
Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_quant import _AMAX_EPS, _fp8_max, saturate


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, ws_ptr, xs_ptr, b_ptr, y_ptr, n, k, stride_xm, stride_wn, stride_ym,
                     STATIC: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     FP8_MAX: tl.constexpr, EPS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    x_row = x_ptr + row * stride_xm
    if STATIC:
        x_scale = tl.load(xs_ptr)
    else:  # the row's amax; x is a few KB and stays in L2 for the second pass
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_row + offs_k, mask=offs_k < k, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xv))
        x_scale = tl.maximum(tl.max(amax, axis=0), EPS) * (1.0 / FP8_MAX)  # as fp8_quant.py
    x_inv = tl.math.div_rn(1.0, x_scale)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        xv = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        xq = saturate(xv * x_inv, FP8_MAX)
        xq = xq.to(w_ptr.dtype.element_ty).to(tl.float32)  # the FP8 rounding of the activation
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * xq[None, :], axis=1)
    if PER_CHANNEL:
        w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        w_scale = tl.load(ws_ptr)
    y = acc * (x_scale * w_scale)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             input_scale: torch.Tensor | None, bias: torch.Tensor | None, *,
             block_n: int = 16, block_k: int = 512, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] 16-bit (any M, but every row re-reads the weight: meant for M = 1), weight [N, K]
    FP8, weight_scale () or [N] fp32, input_scale () fp32 for static activations or None for
    per-row dynamic ones; returns [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    static = input_scale is not None
    per_channel = weight_scale.numel() > 1
    _fp8_gemv_kernel[(triton.cdiv(n, block_n), m)](
        x, weight, weight_scale, input_scale if static else weight_scale, bias if bias is not None else y, y,
        n, k, x.stride(0), weight.stride(0), y.stride(0),
        STATIC=static, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
        FP8_MAX=_fp8_max(weight.dtype), EPS=_AMAX_EPS, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps)
    return y
