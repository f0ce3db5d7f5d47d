"""FLUX.1's attention prologue in one pass (Triton): per-head RMSNorm of Q and K, text tokens
first, rotary embedding, written in the [B, H, S, D] layout attention reads.

  qkv [B, S_img, 3 * H * D] (to_qkv's output), context_qkv [B, S_txt, 3 * H * D] or None
  for q and k:  y = RMSNorm(x; w, eps)          (w: norm_q / norm_k, or norm_added_* on text rows)
                out = y * cos + rotate(y) * sin  (rotate: (y0, y1) -> (-y1, y0) per pair; no rope
                                                  when cos is None; cos, sin [S, D] for every batch
                                                  row, or [B, S, D])
  v:            copied, text rows first (only with write_v)

What it replaces, eager: diffusers' FluxAttnProcessor ops after the projections, about 35 launches
per block (each RMSNorm, the concatenations, RoPE's float copies, negation, stack, multiply, add),
each a round trip of a [S, H * D] tensor through memory (920-1060 us per FLUX.1-dev block on an
H100). Compiled, Inductor fuses them into one to four kernels (80-175 us); this kernel takes 53-74
us against a memory floor of 35-52 (docs/benchmarks/qk_norm_rope_H100.json).

The PyTorch ops round RMSNorm's output to bf16 and compute RoPE in fp32; the kernel rounds at the
same point (RMSNorm itself is computed in fp32 and rounded once, as torch's fused rms_norm does),
so it matches them up to the order of the sum of squares (2e-5 of the values differ by a bf16
step on an H100). With ``round_normed`` it rounds as diffusers' own RMSNorm does instead: the
normalized value to bf16, then its product with the weight (Z-Image's q/k norms). bf16 only. Used
by the FLUX.1, FLUX.2 and Z-Image rewrites.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .fp8_producers import _round_to_bf16

# (rows per program, heads per program, num_warps), from benchmarks/qk_norm_rope.py on an H100
# (docs/benchmarks/qk_norm_rope_H100.json).
CONFIG = (4, 8, 2)


@triton.jit
def _norm_weights(part, wq_img_ptr, wk_img_ptr, wq_txt_ptr, wk_txt_ptr, text, dims):
    """Per row: the RMSNorm weight of q (part 0) or k, the added (text) norm's on text rows."""
    if part == 0:
        w_img = tl.load(wq_img_ptr + dims)
        w_txt = tl.load(wq_txt_ptr + dims)
    else:
        w_img = tl.load(wk_img_ptr + dims)
        w_txt = tl.load(wk_txt_ptr + dims)
    return tl.where(text, w_txt[None, :], w_img[None, :]).to(tl.float32)


@triton.jit
def _normed(x, rstd, w, ROUND_NORMED: tl.constexpr):
    """RMSNorm's output as bf16 values in fp32: torch's fused rms_norm rounds once; diffusers'
    RMSNorm rounds x * rstd to the weight's dtype, then the product with the weight."""
    if ROUND_NORMED:
        return _round_to_bf16(_round_to_bf16(x * rstd) * w)
    return _round_to_bf16(x * rstd * w)


@triton.jit
def _qk_norm_rope_kernel(img_ptr, txt_ptr, out_ptr, wq_img_ptr, wk_img_ptr, wq_txt_ptr, wk_txt_ptr, cos_ptr, sin_ptr,
                         batch, s_img, s_txt, heads, stride_img_b, stride_img_s, stride_txt_b, stride_txt_s,
                         stride_rope_b, stride_rope, eps, HAS_ROPE: tl.constexpr, ROUND_NORMED: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, HEADS: tl.constexpr):
    # Program (s block, b * head groups + group, part), part 0 = q, 1 = k, 2 = v: BLOCK_S rows of
    # HEADS heads, one head after the other, so that the RoPE tables and the norm weights are read
    # once for them all (read per head, the fp32 tables outweighed q and k).
    groups = tl.cdiv(heads, HEADS)
    b = (tl.program_id(1) // groups).to(tl.int64)
    first_head = (tl.program_id(1) % groups) * HEADS
    part = tl.program_id(2)
    s_total = s_txt + s_img
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    live = (rows < s_total)[:, None]
    text = (rows < s_txt)[:, None]
    txt_rows = txt_ptr + b * stride_txt_b + rows[:, None].to(tl.int64) * stride_txt_s
    img_rows = img_ptr + b * stride_img_b + (rows[:, None] - s_txt).to(tl.int64) * stride_img_s
    src_rows = tl.where(text, txt_rows, img_rows) + part * heads * HEAD_DIM
    eps = tl.cast(eps, tl.float32)  # a compiled graph passes it as fp64
    partner = dims ^ 1  # RoPE pairs dims (2i, 2i + 1)
    w = _norm_weights(part, wq_img_ptr, wk_img_ptr, wq_txt_ptr, wk_txt_ptr, text, dims)
    wp = _norm_weights(part, wq_img_ptr, wk_img_ptr, wq_txt_ptr, wk_txt_ptr, text, partner)
    if HAS_ROPE:
        rope = b * stride_rope_b + rows[:, None].to(tl.int64) * stride_rope + dims[None, :]
        cos = tl.load(cos_ptr + rope, mask=live, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rope, mask=live, other=0.0).to(tl.float32)
        sin = tl.where((dims % 2 == 0)[None, :], -sin, sin)  # rotate(y)_d = -y_{d+1} (even d), y_{d-1} (odd)
    for i in range(HEADS):
        h = first_head + i
        mask = live & (h < heads)
        src = src_rows + h * HEAD_DIM
        x = tl.load(src + dims[None, :], mask=mask, other=0.0)
        out = out_ptr + (((part * batch + b) * heads + h) * s_total + rows[:, None]) * HEAD_DIM + dims[None, :]
        if part == 2:
            tl.store(out, x, mask=mask)
        else:
            xf = x.to(tl.float32)
            rstd = libdevice.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)[:, None]
            y = _normed(xf, rstd, w, ROUND_NORMED)
            if HAS_ROPE:
                # The partner values, loaded again (from cache) rather than shuffled in registers.
                xp = tl.load(src + partner[None, :], mask=mask, other=0.0).to(tl.float32)
                y = y * cos + _normed(xp, rstd, wp, ROUND_NORMED) * sin
            tl.store(out, y.to(tl.bfloat16), mask=mask)


def _prologue(qkv, context_qkv, weights, cos, sin, eps, write_v, round_normed, kernel, config=CONFIG) -> torch.Tensor:
    b, s_img, width = qkv.shape
    head_dim = weights[0].shape[-1]
    heads = width // (3 * head_dim)
    txt = qkv if context_qkv is None else context_qkv
    s_txt = 0 if context_qkv is None else context_qkv.shape[1]
    parts = 3 if write_v else 2
    out = torch.empty((parts, b, heads, s_txt + s_img, head_dim), dtype=qkv.dtype, device=qkv.device)
    text_weights = weights[2:] or weights[:2]
    block_s, heads_per_program, warps = config
    if out.numel():
        kernel[(triton.cdiv(s_txt + s_img, block_s), b * triton.cdiv(heads, heads_per_program), parts)](
            qkv, txt, out, *weights[:2], *text_weights, qkv if cos is None else cos, qkv if sin is None else sin,
            b, s_img, s_txt, heads, qkv.stride(0), qkv.stride(1), txt.stride(0), txt.stride(1),
            0 if cos is None or cos.dim() == 2 else cos.stride(0), 0 if cos is None else cos.stride(-2), eps,
            HAS_ROPE=cos is not None, ROUND_NORMED=round_normed, HEAD_DIM=head_dim, BLOCK_S=block_s,
            HEADS=heads_per_program, num_warps=warps)
    return out


def qk_norm_rope(qkv: torch.Tensor, context_qkv: torch.Tensor | None, weights: list[torch.Tensor],
                 cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float, write_v: bool,
                 round_normed: bool = False, *, config: tuple[int, int, int] = CONFIG) -> torch.Tensor:
    """[3 (2 without write_v), B, H, S_txt + S_img, D] bf16: normed and rotated q, k (and v), text
    rows first. weights: the RMSNorm weights [D] of q and k, then of the text rows' q and k when
    context_qkv is given; cos, sin: [S_txt + S_img, D], [B, S_txt + S_img, D] or None, with equal
    strides. qkv and context_qkv: bf16 with a contiguous last dimension, D a power of two (the caller
    checks). ``round_normed``: diffusers' RMSNorm rounding (see above). ``config`` overrides CONFIG."""
    return _prologue(qkv, context_qkv, weights, cos, sin, eps, write_v, round_normed, _qk_norm_rope_kernel, config)


# The same as an operator torch.compile places in a graph (torch >= 2.6); None on older torch.
if hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("diffgen_cuda::qk_norm_rope", mutates_args=())
    def _qk_norm_rope_op(qkv: torch.Tensor, context_qkv: torch.Tensor | None, weights: list[torch.Tensor],
                         cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float,
                         write_v: bool, round_normed: bool = False) -> torch.Tensor:
        return _prologue(qkv, context_qkv, weights, cos, sin, eps, write_v, round_normed,
                         torch.library.wrap_triton(_qk_norm_rope_kernel))

    qk_norm_rope_op = torch.ops.diffgen_cuda.qk_norm_rope
else:
    qk_norm_rope_op = None
