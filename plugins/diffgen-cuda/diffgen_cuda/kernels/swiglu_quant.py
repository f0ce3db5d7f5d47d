"""FLUX.2's SwiGLU (and the single block's concatenation) and the FP8 quantization of its output, in
one pass (Triton).

  swiglu_concat_quant(a [.., Ka] or None, h [.., 2 * I])
      y = cat([a, silu(h[..., :I]) * h[..., I:]], -1)
then q = sat(y * (1 / input_scale)) (static), or s = max(amax(|y_row|), 1e-12) / 448,
q = sat(y * (1 / s)) (per token): the definitions of fp8_quant.py, as in fp8_producers.py.

diffusers' Flux2SwiGLU in bf16 rounds silu's output to bf16 and then the product; the kernel rounds
at the same two points (silu computed as g / (1 + exp(-g)) in fp32, PyTorch's formula), so y matches
the PyTorch ops up to the last fp32 ulp of exp. bf16 activations only (diffgen_cuda.fused checks).
Used by the FLUX.2 rewrites (diffgen_cuda.flux2) for ff.linear_out, ff_context.linear_out and the
single block's attn.to_out (K = 6144 + 18432 for FLUX.2-dev, too wide a row for Inductor to
quantize in the pass that computes it; see diffgen_cuda.fused.WIDE_ROW).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_producers import _quantize_row, _round_to_bf16, _warps
from .fp8_quant import _AMAX_EPS, _fp8_max


@triton.jit
def _swiglu_concat_quant_kernel(a_ptr, h_ptr, q_ptr, s_ptr, in_scale_ptr, ka, ki, stride_a, stride_h,
                                STATIC: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    # Program (row, j) takes columns [j * BLOCK, (j + 1) * BLOCK) of the output row [a, swiglu]; with
    # per-token scales one block spans the whole row (its amax is needed before any q).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k = ka + ki
    in_a = cols < ka
    in_row = cols < k
    in_h = in_row & ~in_a
    a = tl.load(a_ptr + row * stride_a + cols, mask=in_a, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + row * stride_h + (cols - ka), mask=in_h, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + ki + (cols - ka), mask=in_h, other=0.0).to(tl.float32)
    act = _round_to_bf16(gate / (1.0 + tl.exp(-gate)))
    y = tl.where(in_a, a, _round_to_bf16(act * up))
    q = _quantize_row(y, in_row, q_ptr + row * k, s_ptr, row, in_scale_ptr, STATIC, FP8_MAX, EPS)
    tl.store(q_ptr + row * k + cols, q, mask=in_row)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _swiglu_concat(a, h, input_scale, dtype, kernel) -> tuple[torch.Tensor, torch.Tensor]:
    h2 = _rows(h)
    a2 = None if a is None else _rows(a)
    ka, ki = (0 if a2 is None else a2.shape[1]), h2.shape[1] // 2
    static = input_scale is not None
    rows = h2.shape[0]
    q = torch.empty((rows, ka + ki), dtype=dtype, device=h.device)
    s = torch.empty((0 if static else rows, 1), dtype=torch.float32, device=h.device)
    # Static scales need no row reduction: blocks of 1024 columns, many programs per row.
    block = 1024 if static else triton.next_power_of_2(ka + ki)
    if rows:
        kernel[(rows, triton.cdiv(ka + ki, block))](
            h2 if a2 is None else a2, h2, q, q if static else s, q if input_scale is None else input_scale,
            ka, ki, 0 if a2 is None else a2.stride(0), h2.stride(0), STATIC=static,
            FP8_MAX=_fp8_max(dtype), EPS=_AMAX_EPS, BLOCK=block, num_warps=_warps(block))
    return q, s


def swiglu_concat_quant(a: torch.Tensor | None, h: torch.Tensor, input_scale: torch.Tensor | None,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, Ka + I], input_scale or s [M, 1]) of cat([a, silu(h[..., :I]) * h[..., I:]], -1).
    a and h: bf16; h's last dimension even; rows may be strided (a slice of a wider output)."""
    q, s = _swiglu_concat(a, h, input_scale, dtype, _swiglu_concat_quant_kernel)
    return q, input_scale if input_scale is not None else s


# The same as an operator torch.compile places in a graph (torch >= 2.6); None on older torch. For
# static scales the second output is empty.
if hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("diffgen_cuda::swiglu_concat_quant", mutates_args=())
    def _swiglu_concat_op(a: torch.Tensor | None, h: torch.Tensor, input_scale: torch.Tensor | None,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return _swiglu_concat(a, h, input_scale, dtype, torch.library.wrap_triton(_swiglu_concat_quant_kernel))

    swiglu_concat_quant_op = torch.ops.diffgen_cuda.swiglu_concat_quant
else:
    swiglu_concat_quant_op = None
