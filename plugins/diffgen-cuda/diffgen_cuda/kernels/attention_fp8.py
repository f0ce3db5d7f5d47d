"""Quantized attention in the manner of SageAttention2: INT8 Q.K^T and FP8 (E4M3) P.V, fp32 softmax.

For one batch x head, queries in blocks of BLOCK_M tokens, keys in blocks of BLOCK_N:
  K' = K - mean_tokens(K)                       exact: it shifts every score of a query by the same
                                                amount, which softmax ignores; it takes the shared
                                                offset (outlier channels) out of K's INT8 range
  q8 = round(Q * 127 / amax(Q_blk)),   sq = amax(Q_blk) / 127 * sm_scale * log2(e)   one per Q block
  k8 = round(K' * 127 / amax(K'_blk)), sk = amax(K'_blk) / 127                        one per K block
  v8 = fp8(V / sv),                    sv = amax_tokens(|V[:, d]|) / 448              one per channel
  S  = (q8 . k8^T) * sq * sk           (int32 accumulation: exact)   = log2(e) * Q K'^T * sm_scale
  online softmax over key blocks in fp32 with exp2: m = running row max,
  P  = exp2(S - m + 8)                 at most 2^8, so its E4M3 rounding keeps small weights normal
  acc = acc * exp2(m_old - m) + fp8(P) . v8     (fp32 accumulation);  l likewise sums P (unrounded)
  O  = acc / l * sv                    bf16/fp16, written in the caller's layout
Rounding to int8 is half away from zero; round(x) of a block's amax element is +-127.

Options, set per launch config (``attention_fp8.launch_config`` names them): MAGIC_I2F and
FOLD_I2F (see ``_int32_to_float`` and ``_softmax_pv``). What each compiles to for sm_90a, without
a GPU: benchmarks/attention_sass.py (docs/benchmarks/attention_sass_sm90.json). Tried there and
dropped: E4M3 Q and K instead of INT8, and P by the packed fp16 exp2 (both farther from their
reference than the GPU tests allow at 4,096 keys on an H200, and neither faster); issuing block j+1's Q.K^T before block j's softmax (Triton 3.6 still waits for the wgmma
right after issuing it: its pipeliner keeps a dot in flight across iterations only for another
dot's accumulator; ``kernels.attention_gluon`` does it with explicit async wgmma), and
FlashAttention-4's lazy rescaling (the program-wide decision put two CTA barriers in every block,
and ptxas serialized the wgmmas around the rescale).

Each attention program quantizes its own Q block (read once). K and V are quantized by a pre-pass
(``quantize_kv``, after PyTorch's K mean and V channel amax) into padded buffers in the kernel's own
layout: k8 [BH, Lk_pad, D] int8, v8 transposed [BH, D, Lk_pad] (so both 8-bit dot operands are
K-major, as Hopper's wgmma wants them), zero in the padding; the key loads need no masks and only
the last key block masks its columns. ``v_dtype`` float32 keeps V's
E4M3 values in fp32 and ``p_dtype`` float32 skips P's rounding, so Triton's interpreter (no FP8
dot) can check the indexing. Importing this module imports Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_constants import MAGIC, MAGIC_BITS, P_EXPONENT_OFFSET

LOG2E = math.log2(math.e)
FP8_E4M3_MAX = 448.0


@triton.jit
def _quant_block(x, factor):
    """An fp32 block -> (INT8 codes round(x * 127 / amax) half away from zero, fp32 scale * factor)."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    amax = tl.where(amax > 0, amax, 127.0)  # an all-zero block: any scale, codes 0
    xq = x * tl.math.div_rn(127.0, amax)
    codes = tl.where(xq >= 0, xq + 0.5, xq - 0.5).to(tl.int8)  # the cast truncates
    return codes, tl.math.div_rn(amax, 127.0) * factor


@triton.jit
def _quant_kv(k_ptr, v_ptr, mean_ptr, sv_ptr, k8_ptr, sk_ptr, v8_ptr, L, H, L_PAD, stride_kb, stride_kh, stride_kl,
              stride_vb, stride_vh, stride_vl, BLOCK: tl.constexpr, D: tl.constexpr):
    """One block of tokens of one (batch, head): k8, its scale, and v8 transposed."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    inside = rows[:, None] < L
    rows64 = rows[:, None].to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + rows64 * stride_kl + cols[None, :], mask=inside,
                other=0.0).to(tl.float32)
    k = tl.where(inside, k - tl.load(mean_ptr + bh * D + cols)[None, :], 0.0)
    k8, sk = _quant_block(k, 1.0)
    tl.store(k8_ptr + bh * L_PAD * D + rows[:, None] * D + cols[None, :], k8)
    tl.store(sk_ptr + bh * (L_PAD // BLOCK) + pid, sk)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + rows64 * stride_vl + cols[None, :], mask=inside,
                other=0.0).to(tl.float32)
    v = tl.math.div_rn(v, tl.load(sv_ptr + bh * D + cols)[None, :])
    tl.store(v8_ptr + bh * D * L_PAD + cols[:, None] * L_PAD + rows[None, :], tl.trans(v).to(v8_ptr.dtype.element_ty))


@triton.jit
def _int32_to_float(s, MAGIC_I2F: tl.constexpr):
    if MAGIC_I2F:
        # the magic-number conversion (attention_constants.MAGIC_BITS) at full rate: I2F is quarter rate
        return (s + MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC
    else:
        return s.to(tl.float32)


@triton.jit
def _softmax_pv(s, sq, v_ptrs, sk_ptr, j, m_i, l_i, acc, Lk, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                P_DTYPE: tl.constexpr, MAGIC_I2F: tl.constexpr, FOLD_I2F: tl.constexpr):
    """Key block j's raw int32 scores s (the Q.K^T MMA's) into the online softmax and acc."""
    if FOLD_I2F:
        # s stays 1.5 * 2^23 + s (exact, one integer add and a bitcast): the row max takes one exact
        # subtraction per row, and the constant joins the FMA's per-row term; that term's rounding
        # moves an exponent by at most 0.75 * scale (~1e-3, against fp16's 2^-8 at |x| < 8)
        s = (s + MAGIC_BITS).to(tl.float32, bitcast=True)
        shift = MAGIC
    else:
        s = _int32_to_float(s, MAGIC_I2F)
        shift = 0.0
    scale = sq * tl.load(sk_ptr + j)  # > 0, so max(s) * scale is the largest scaled score, bit for bit
    if MASK:
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = tl.where(cols[None, :] < Lk, s, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(s, axis=1) - shift) * scale)
    p = tl.math.exp2(s * scale - (shift * scale + m_new - P_EXPONENT_OFFSET)[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    v = tl.load(v_ptrs)
    acc = tl.dot(p.to(P_DTYPE), tl.trans(v).to(P_DTYPE), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attention_fp8_kernel(q_ptr, k_ptr, v_ptr, sk_ptr, sv_ptr, o_ptr, q_factor, Lq, Lk, FULL_BLOCKS, H, LK_PAD,
                          stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, D: tl.constexpr, P_DTYPE: tl.constexpr, MAGIC_I2F: tl.constexpr,
                          FOLD_I2F: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    # This program's Q block, quantized here: it is read once, so no pre-pass is needed for it.
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_ql + cols[None, :],
                mask=rows[:, None] < Lq, other=0.0).to(tl.float32)
    q, sq = _quant_block(q, q_factor)
    k_ptrs = k_ptr + bh * LK_PAD * D + keys[:, None] * D + cols[None, :]
    v_ptrs = v_ptr + bh * D * LK_PAD + cols[:, None] * LK_PAD + keys[None, :]
    sk_ptr = sk_ptr + bh * (LK_PAD // BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for j in tl.range(0, FULL_BLOCKS):  # the key blocks with no padding
        s = tl.dot(q, tl.trans(tl.load(k_ptrs)))
        m_i, l_i, acc = _softmax_pv(s, sq, v_ptrs, sk_ptr, j, m_i, l_i, acc, Lk, BLOCK_N, False, P_DTYPE, MAGIC_I2F,
                                    FOLD_I2F)
        k_ptrs += BLOCK_N * D
        v_ptrs += BLOCK_N
    if FULL_BLOCKS * BLOCK_N < Lk:
        s = tl.dot(q, tl.trans(tl.load(k_ptrs)))
        m_i, l_i, acc = _softmax_pv(s, sq, v_ptrs, sk_ptr, FULL_BLOCKS, m_i, l_i, acc, Lk, BLOCK_N, True, P_DTYPE,
                                    MAGIC_I2F, FOLD_I2F)
    out = acc / l_i[:, None] * tl.load(sv_ptr + bh * D + cols)[None, :]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_ol + cols[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < Lq)


def _padded(length: int, block: int) -> int:
    return triton.cdiv(length, block) * block


def _bhld_strides(x: torch.Tensor, heads_first: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, H, L, D] (heads_first) or [B, L, H, D] tensor."""
    return (x.stride(0), x.stride(1), x.stride(2)) if heads_first else (x.stride(0), x.stride(2), x.stride(1))


def quantize_kv(k: torch.Tensor, v: torch.Tensor, heads_first: bool, block: int, mean: torch.Tensor,
                sv: torch.Tensor, v_dtype: torch.dtype = torch.float8_e4m3fn, kernel=_quant_kv):
    """k, v [B, H, L, D] or [B, L, H, D] (last dim contiguous) -> (k8 int8 [B*H, L_pad, D], sk fp32 [B*H, L_pad/block], v8 [B*H, D, L_pad] in ``v_dtype``): K less ``mean``
    [B*H, D] fp32 in 8 bits per block, V divided by ``sv`` [B*H, D] fp32 per channel. ``v_dtype``
    float32 is the interpreter's stand-in for E4M3 (rounded to E4M3 values here)."""
    B, D = k.shape[0], k.shape[3]
    H, L = (k.shape[1], k.shape[2]) if heads_first else (k.shape[2], k.shape[1])
    l_pad = _padded(L, block)
    k8 = torch.empty((B * H, l_pad, D), device=k.device, dtype=torch.int8)
    sk = torch.empty((B * H, l_pad // block), device=k.device, dtype=torch.float32)
    v8 = torch.empty((B * H, D, l_pad), device=k.device, dtype=v_dtype)
    kernel[(l_pad // block, B * H)](k, v, mean, sv, k8, sk, v8, L, H, l_pad, *_bhld_strides(k, heads_first),
                                    *_bhld_strides(v, heads_first), BLOCK=block, D=D, num_warps=4)
    if v_dtype == torch.float32:
        v8 = v8.to(torch.float8_e4m3fn).float()
    return k8, sk, v8


def attention(q, k8, sk, v8, sv, out: torch.Tensor, heads_first: bool, sm_scale: float, Lk: int, *, block_m: int,
              block_n: int, num_warps: int, num_stages: int, magic_i2f: bool = True, fold_i2f: bool = False,
              maxnreg: int | None = None, gluon: bool = False, p_dtype=None, kernel=_attention_fp8_kernel) -> None:
    """Write the attention of q (16-bit, quantized to INT8 in the kernel) and the quantized K, V
    into ``out`` (q's layout: [B, H, Lq, D] or [B, Lq, H, D]). ``fold_i2f`` leaves the int32 ->
    fp32 conversion's constant to the FMA; ``maxnreg`` caps the registers per thread; ``gluon``
    runs the same math (with fold_i2f) by ``kernels.attention_gluon``."""
    B, D = q.shape[0], q.shape[3]
    H, Lq = (q.shape[1], q.shape[2]) if heads_first else (q.shape[2], q.shape[1])
    if gluon:
        try:
            from . import attention_gluon
        except ImportError as exc:
            raise RuntimeError(f"the -gluon attention configs need Triton's Gluon (Triton 3.5+): {exc}") from exc

        attention_gluon.launch(q, k8, sk, v8, sv, out, sm_scale * LOG2E, Lq, Lk, H, _bhld_strides(q, heads_first),
                               _bhld_strides(out, heads_first), block_m=block_m, block_n=block_n,
                               num_warps=num_warps, num_stages=num_stages)
        return
    if p_dtype is None:
        p_dtype = tl.float8e4nv if v8.dtype == torch.float8_e4m3fn else tl.float32
    kernel[(triton.cdiv(Lq, block_m), B * H)](
        q, k8, v8, sk, sv, out, sm_scale * LOG2E, Lq, Lk, Lk // block_n, H, k8.shape[1],
        *_bhld_strides(q, heads_first), *_bhld_strides(out, heads_first), BLOCK_M=block_m, BLOCK_N=block_n, D=D,
        P_DTYPE=p_dtype, MAGIC_I2F=magic_i2f, FOLD_I2F=fold_i2f,
        num_warps=num_warps, num_stages=num_stages,
        **({} if maxnreg is None else {"maxnreg": maxnreg}))
