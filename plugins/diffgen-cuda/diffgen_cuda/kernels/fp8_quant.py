"""One-pass FP8 activation quantization (Triton).

  quant_fp8_static(x [M, K], scale ())        -> q [M, K]             q = sat(x * (1 / scale))
  quant_fp8_per_token(x [M, K])               -> q [M, K], s [M, 1]   s = max(amax(|x_row|), 1e-12) / 448
                                                                      q = sat(x * (1 / s))
  quant_fp8_per_token(x, dtype, smoothing [K])                        the same of x * smoothing, that
                                                                      product rounded to x's dtype first
  head_amax(x [B, L, H, D], mean [B, H, D] | None) -> amax [B, H]    max |x - mean| per (batch, head)
  head_stats(x [B, L, H, D])                  -> mean [B, H, D], amax [B, H]   x's token mean, and
                                                                      head_amax(x, mean), in one pass
  quant_fp8_per_head(x, mean, descale [B, H], dtype) -> q [B, L, H, D] q = sat((x - mean) * (1 / descale))
sat() clamps to the FP8 type's finite range before the cast, as diffgen.numerics.fp8 does, and the
arithmetic is PyTorch's on CUDA: 1 / scale and 1 / s are IEEE round-to-nearest divisions
(tl.math.div_rn; Triton's plain `/` is approximate and flipped an FP8 rounding in a 300 x 15360
test on an H100), while amax / 448 is a multiplication by the fp32 reciprocal (what ATen does when
dividing by a Python number). So the results are bit-identical to the builtin PyTorch path. The
kernels divide once per row or tensor: dividing every element made the per-token kernel 1.3-1.8x
slower at K >= 3072 on an H100 (4608 x 15360: 98 us against 72 us). Each
kernel reads x once and writes q once; the scales stay on the device (no .item(), no host sync), so
eager calls capture into CUDA graphs.
Eager calls launch the kernels directly, without a custom-op wrapper, because its dispatch cost per
call was measurable against a 0.1 ms GEMM. Under torch.compile the caller mostly uses PyTorch
expressions, which Inductor fuses into the preceding op; for very wide rows it calls the per-token
kernel through the operator registered at the end (see diffgen_cuda.fused). Importing this module
imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_AMAX_EPS = 1e-12  # the same floor as diffgen.numerics.fp8


@triton.jit
def saturate(v, FP8_MAX: tl.constexpr):
    """Clamp to the FP8 range as torch.clamp does: NaN stays NaN (Triton's default min/max would
    return the other operand and turn a NaN activation into a finite +-448)."""
    v = tl.maximum(v, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quant_static_kernel(x_ptr, q_ptr, scale_ptr, n, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale_inv = tl.math.div_rn(1.0, tl.load(scale_ptr))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = saturate(x * scale_inv, FP8_MAX)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_per_token_kernel(x_ptr, q_ptr, s_ptr, k, stride_x, stride_q, smooth_ptr, FP8_MAX: tl.constexpr,
                            EPS: tl.constexpr, BLOCK_K: tl.constexpr, SMOOTH: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < k
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if SMOOTH:  # x * smoothing as PyTorch computes it in x's dtype: in fp32, rounded once to that dtype
        smoothing = tl.load(smooth_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * smoothing).to(x.dtype, fp_downcast_rounding="rtne")
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), EPS) * (1.0 / FP8_MAX)
    q = saturate(x * tl.math.div_rn(1.0, scale), FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _head_tile(x_ptr, mean_ptr, L, H, stride_b, stride_l, stride_h, D: tl.constexpr, BLOCK_L: tl.constexpr,
               SMOOTH: tl.constexpr):
    """This program's (b, h, tokens) tile of x [B, L, H, D] in fp32, less the head's token mean
    when SMOOTH (0 outside the tokens), with its (b, h, rows, cols)."""
    b, h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, D)
    inside = (rows < L)[:, None]
    x = tl.load(x_ptr + b * stride_b + h * stride_h + rows[:, None] * stride_l + cols[None, :], mask=inside,
                other=0.0).to(tl.float32)
    if SMOOTH:
        x = tl.where(inside, x - tl.load(mean_ptr + (b * H + h) * D + cols)[None, :], 0.0)
    return x, b, h, rows, cols, inside


@triton.jit
def _head_amax_kernel(x_ptr, mean_ptr, amax_ptr, L, H, stride_b, stride_l, stride_h, D: tl.constexpr,
                      BLOCK_L: tl.constexpr, SMOOTH: tl.constexpr):
    x, b, h, rows, cols, inside = _head_tile(x_ptr, mean_ptr, L, H, stride_b, stride_l, stride_h, D, BLOCK_L, SMOOTH)
    tl.atomic_max(amax_ptr + b * H + h, tl.max(tl.max(tl.abs(x), axis=1), axis=0))  # >= 0: a float max


@triton.jit
def _head_stats_kernel(x_ptr, sum_ptr, max_ptr, min_ptr, L, H, stride_b, stride_l, stride_h, D: tl.constexpr,
                       BLOCK_L: tl.constexpr):
    """Per tile: the column sums, maxima and minima of its tokens, into [tiles, B, H, D] partials."""
    x, b, h, rows, cols, inside = _head_tile(x_ptr, x_ptr, L, H, stride_b, stride_l, stride_h, D, BLOCK_L, False)
    out = ((tl.program_id(0).to(tl.int64) * tl.num_programs(2) + b) * H + h) * D + cols
    tl.store(sum_ptr + out, tl.sum(x, axis=0))
    tl.store(max_ptr + out, tl.max(tl.where(inside, x, -float("inf")), axis=0))
    tl.store(min_ptr + out, tl.min(tl.where(inside, x, float("inf")), axis=0))


@triton.jit
def _quant_per_head_kernel(x_ptr, mean_ptr, descale_ptr, q_ptr, L, H, stride_b, stride_l, stride_h,
                           FP8_MAX: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, SMOOTH: tl.constexpr):
    x, b, h, rows, cols, inside = _head_tile(x_ptr, mean_ptr, L, H, stride_b, stride_l, stride_h, D, BLOCK_L, SMOOTH)
    q = saturate(x * tl.math.div_rn(1.0, tl.load(descale_ptr + b * H + h)), FP8_MAX)
    tl.store(q_ptr + ((b * L + rows[:, None]) * H + h) * D + cols[None, :], q.to(q_ptr.dtype.element_ty),
             mask=inside)


def _per_head_launch(x: torch.Tensor, mean: torch.Tensor | None):
    """(grid, x's strides and sizes, mean) for the per-head kernels; x [B, L, H, D] with unit
    stride in D (any other layout: [B, H, L, D] views too), D a power of two."""
    batch, length, heads, dim = x.shape
    if x.stride(-1) != 1 or dim & (dim - 1):
        raise ValueError(f"per-head FP8 quantization needs unit stride in a power-of-two head dim; got shape "
                         f"{tuple(x.shape)}, strides {x.stride()}")
    if mean is not None and (mean.shape != (batch, heads, dim) or mean.dtype != torch.float32):
        raise ValueError(f"mean {tuple(mean.shape)} {mean.dtype} is not [{batch}, {heads}, {dim}] float32")
    block_l = max(16, 8192 // dim)
    grid = (triton.cdiv(length, block_l), heads, batch)
    args = (length, heads, x.stride(0), x.stride(1), x.stride(2))
    return grid, args, (x if mean is None else mean.contiguous()), dict(D=dim, BLOCK_L=block_l,
                                                                         SMOOTH=mean is not None, num_warps=4)


def head_amax(x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """max |x - mean| over tokens and head dim, fp32 [B, H]; x [B, L, H, D], mean fp32 [B, H, D]."""
    grid, args, mean_arg, meta = _per_head_launch(x, mean)
    amax = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)
    if x.numel():
        _head_amax_kernel[grid](x, mean_arg, amax, *args, **meta)
    return amax


def head_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, amax) of x [B, L, H, D] in one pass over x: its mean over tokens, fp32 [B, H, D]
    (partial sums per tile, then summed in a fixed order: deterministic, though rounded otherwise
    than ``x.mean``), and max |x - mean| over tokens and head dim, fp32 [B, H], exactly what
    ``head_amax(x, mean)`` gives: fp32 subtraction rounds monotonically, so the largest |x - mean|
    of a column is its maximum or minimum less the mean."""
    grid, args, _, meta = _per_head_launch(x, None)
    batch, length, heads, dim = x.shape
    if not x.numel():
        return torch.full((batch, heads, dim), float("nan"), device=x.device), torch.zeros(batch, heads, device=x.device)
    sums, maxima, minima = torch.empty((3, grid[0], batch, heads, dim), dtype=torch.float32, device=x.device)
    _head_stats_kernel[grid](x, sums, maxima, minima, *args, D=dim, BLOCK_L=meta["BLOCK_L"], num_warps=4)
    mean = sums.sum(dim=0) / length
    amax = torch.maximum(maxima.amax(dim=0) - mean, mean - minima.amin(dim=0)).amax(dim=-1)
    return mean, amax


def quant_fp8_per_head(x: torch.Tensor, mean: torch.Tensor | None, descale: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """sat((x - mean) * (1 / descale[b, h])) as ``dtype``, contiguous [B, L, H, D]."""
    grid, args, mean_arg, meta = _per_head_launch(x, mean)
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel():
        _quant_per_head_kernel[grid](x, mean_arg, descale.contiguous(), q, *args, FP8_MAX=_fp8_max(dtype), **meta)
    return q


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quant_fp8_static(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    block = 4096
    _quant_static_kernel[(triton.cdiv(n, block),)](x, q, scale, n, FP8_MAX=_fp8_max(dtype), BLOCK=block,
                                                   num_warps=8)
    return q


def quant_fp8_per_token(x: torch.Tensor, dtype: torch.dtype,
                        smoothing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token(x, dtype, _quant_per_token_kernel, smoothing)


def _per_token(x: torch.Tensor, dtype: torch.dtype, kernel,
               smoothing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=dtype, device=x.device)
    s = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(k)
    warps = 4 if block_k <= 2048 else 8 if block_k <= 8192 else 16
    if x2.shape[0]:
        if smoothing is not None and (smoothing.shape != (k,) or smoothing.dtype != x.dtype):
            raise ValueError(f"smoothing {tuple(smoothing.shape)} {smoothing.dtype} is not [{k}] {x.dtype}")
        kernel[(x2.shape[0],)](x2, q, s, k, x2.stride(0), q.stride(0),
                               x2 if smoothing is None else smoothing.contiguous(), FP8_MAX=_fp8_max(dtype),
                               EPS=_AMAX_EPS, BLOCK_K=block_k, SMOOTH=smoothing is not None, num_warps=warps)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


# The per-token kernel as an operator torch.compile can place in a graph (torch >= 2.6), for the
# rows diffgen_cuda.fused sends here instead of to Inductor's fusion; None on older torch.
if hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("diffgen_cuda::quant_fp8_per_token", mutates_args=())
    def _per_token_op(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return _per_token(x, dtype, torch.library.wrap_triton(_quant_per_token_kernel))

    quant_fp8_per_token_op = torch.ops.diffgen_cuda.quant_fp8_per_token
else:
    quant_fp8_per_token_op = None
