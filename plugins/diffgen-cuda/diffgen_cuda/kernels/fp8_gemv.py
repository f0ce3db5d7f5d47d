"""FP8-weight GEMM for inputs of a few rows, whose activations stay 16-bit
(diffgen.builtin.fp8_methods.WEIGHT_ONLY_ROWS):

  y[m, n] = (sum_k x[m, k] * W[n, k]) * s_w[n] + b[n]

x bf16 or fp16 as it is, W float8; fp32 accumulation; s_w per tensor or per output channel. Diffusion
transformers run their modulation linears (FLUX's norm1.linear: 3072 -> 18432 on the timestep
embedding) with one row per sample, where the time is that of reading the weight. Each program
reads its [BLOCK_N, K] slice of the FP8 weight once: one row multiplies it on the CUDA cores
(weight and row widened to fp32); two to four rows take a tensor-core dot over 16 rows, the
unused ones masked (the weight widened to x's dtype, which is exact: every e4m3 value is a bf16 and
an fp16 value). Both accumulate exact products in fp32.
Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffgen.builtin.fp8_methods import WEIGHT_ONLY_ROWS

MAX_ROWS = WEIGHT_ONLY_ROWS


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, m, n, k, stride_xm, stride_wn, stride_ym,
                     PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < m
    mask_n = offs_n < n
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if BLOCK_M == 1:
            xv = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)[None, :]
        else:
            xv = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(xv, tl.trans(w.to(xv.dtype)), acc)
    if PER_CHANNEL:
        y = acc * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    else:
        y = acc * tl.load(ws_ptr)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) for one row and for two to four, from
# benchmarks/fp8_gemv.py on an H100 (docs/benchmarks/fp8_gemv_H100.json).
ONE_ROW = (16, 512, 4, 3)
FEW_ROWS = (32, 256, 4, 3)


def _gemv(x, weight, weight_scale, bias, kernel, config=None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fp8_gemv takes at most {MAX_ROWS} rows, got {m}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config or (ONE_ROW if m == 1 else FEW_ROWS)
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))  # tl.dot takes 16 rows at least
    if m:
        kernel[(triton.cdiv(n, block_n),)](
            x, weight, weight_scale, bias if bias is not None else y, y, m, n, k,
            x.stride(0), weight.stride(0), y.stride(0),
            PER_CHANNEL=weight_scale.numel() > 1, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, *, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] 16-bit with M <= MAX_ROWS, weight [N, K] FP8, weight_scale () or [N] fp32, bias [N]
    or None; returns [M, N] in x's dtype. ``config`` overrides ONE_ROW / FEW_ROWS."""
    return _gemv(x, weight, weight_scale, bias, _fp8_gemv_kernel, config)


# The same as an operator torch.compile places in a graph (torch >= 2.6); None on older torch.
if hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("diffgen_cuda::fp8_gemv", mutates_args=())
    def _fp8_gemv_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        return _gemv(x, weight, weight_scale, bias, torch.library.wrap_triton(_fp8_gemv_kernel))

    fp8_gemv_op = torch.ops.diffgen_cuda.fp8_gemv
else:
    fp8_gemv_op = None
