"""FP8 (OCP E4M3 "fn", E5M2; AMD E4M3 "fnuz") quantization with a dequant-multiplier scale.

Tensors: ``q`` float8 of any shape; ``scale`` fp32 that broadcasts against ``q``:
0-d per tensor, [N] or [N, 1] per output row of a [N, K] weight, [..., 1] per token,
[ceil(N/bn), ceil(K/bk)] per (bn, bk) block (HF "fine-grained fp8" ``weight_scale_inv``).

    scale = amax / fp8_max          (amax over the tensor, row, token or block)
    q     = fp8(clamp(x / scale, -fp8_max, fp8_max))       round to nearest even
    x    ~= float(q) * scale

Activations multiply by the reciprocal instead, x * (1 / scale), as GPU kernels do (vLLM's among
them): one division per row (dynamic per-token) or per tensor (a static input scale) rather than
per element, which made the kernels 1.3-1.8x slower on an H100. That can differ from x / scale in
the last fp32 bit, so an FP8 rounding flips only where x / scale lies within one fp32 ulp of a
tie; the GPU kernels use the same expression and match it bit for bit. Weights divide.

Every "scale" here is the dequant multiplier, as in ModelOpt ``weight_scale``/``input_scale``,
HF ``weight_scale_inv`` (despite its name) and ``torch._scaled_mm``'s ``scale_a``/``scale_b``.
"""

from __future__ import annotations

import math

import torch

FP8_E4M3_MAX = 448.0  # S.1111.110 = 1.75 * 2^8; S.1111.111 is NaN
FP8_E5M2_MAX = 57344.0  # S.11110.11 = 1.75 * 2^15; exponent 11111 is inf/NaN

# Lower bound on amax so an all-zero tensor gets a positive, normal fp32 scale (1e-12 / 448 is
# far above fp32's 1.2e-38 min normal) and 0 / scale stays 0 instead of NaN.
_AMAX_EPS = 1e-12


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 240 for e4m3fnuz, 57344 for e5m2)."""
    if not dtype.is_floating_point or dtype.itemsize != 1:
        raise ValueError(f"fp8_max needs a float8 dtype, got {dtype}")
    return float(torch.finfo(dtype).max)


def _as_scale(scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """fp32 scale shaped to broadcast against ``like``; a 1-D [N] scale means one per row."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=like.device)
    if scale.ndim == 1 and scale.numel() > 1:
        scale = scale.unsqueeze(-1)
    return scale


def quantize_fp8(
    x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float8_e4m3fn
) -> torch.Tensor:
    """x / scale, saturated to the dtype's finite range, then cast (x ~= q * scale)."""
    # The clamp is needed: depending on the torch build and dtype, the cast turns overflow into
    # NaN (e4m3fn on torch 2.11, e4m3fnuz) or inf (e5m2) instead of saturating.
    m = fp8_max(dtype)
    return (x.float() / _as_scale(scale, x)).clamp(-m, m).to(dtype)


def quantize_fp8_static(
    x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> torch.Tensor:
    """An activation with a static (calibrated) per-tensor scale: x * (1 / scale), saturated."""
    m = fp8_max(dtype)
    return (x.float() * _as_scale(scale, x).reciprocal()).clamp(-m, m).to(dtype)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor | float, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """float(q) * scale, with scale 0-d, [1], [N] (per row), [N, 1] or [..., 1]."""
    return (q.float() * _as_scale(scale, q)).to(out_dtype)


def per_tensor_scale(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """0-d fp32 scale amax(|x|) / fp8_max."""
    return x.abs().amax().float().clamp_min(_AMAX_EPS) / fp8_max(dtype)


def per_channel_scale(w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """fp32 scale [N] for a [N, K] weight: row amax over K / fp8_max."""
    return w.abs().amax(dim=-1).float().clamp_min(_AMAX_EPS) / fp8_max(dtype)


def quantize_fp8_per_token(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row quantization of an activation [..., K] -> (q [..., K], scale [..., 1]).

    q = x * (1 / scale) (see the module docstring). Tensor ops only (no .item(), no branch on
    values), so it traces under torch.compile and replays inside CUDA graphs.
    """
    m = fp8_max(dtype)
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(_AMAX_EPS) / m
    return (x.float() * scale.reciprocal()).clamp(-m, m).to(dtype), scale


def _block_grid(shape: torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"block fp8 needs a 2-D [N, K] weight, got shape {tuple(shape)}")
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def quantize_fp8_block(
    w: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D block quantization -> (q [N, K], scale_inv [ceil(N/bn), ceil(K/bk)] fp32).

    Edge blocks are partial; zero padding does not change their amax since |0| <= amax.
    """
    n, k = w.shape
    bn, bk = block
    rows, cols = _block_grid(w.shape, block)
    padded = torch.nn.functional.pad(w.float(), (0, cols * bk - k, 0, rows * bn - n))
    tiles = padded.reshape(rows, bn, cols, bk)
    scale_inv = tiles.abs().amax(dim=(1, 3)).clamp_min(_AMAX_EPS) / fp8_max(dtype)
    q = quantize_fp8(tiles, scale_inv[:, None, :, None], dtype)
    return q.reshape(rows * bn, cols * bk)[:n, :k].contiguous(), scale_inv


def dequantize_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """float(q[n, k]) * scale_inv[n // bn, k // bk]."""
    n, k = q.shape
    grid = _block_grid(q.shape, block)
    if tuple(scale_inv.shape) != grid:
        raise ValueError(
            f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight "
            f"{(n, k)} with block {tuple(block)}: expected {grid}"
        )
    s = scale_inv.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return (q.float() * s).to(out_dtype)


def fp8_e4m3fn_to_e4m3fnuz(
    q: torch.Tensor, scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinterpret OCP e4m3fn codes as AMD MI300 e4m3fnuz with the same dequantized values.

    fnuz has exponent bias 8 instead of 7, so each bit pattern means half the fn value and the
    scale doubles. 0x80 is -0 in fn but the only NaN in fnuz, so it becomes 0x00. The fn NaN
    codes 0x7F/0xFF have no fnuz NaN to go to; they turn into +-240 (i.e. +-480 * scale), so
    a checkpoint must not contain them.
    """
    bits = q.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), torch.as_tensor(scale, dtype=torch.float32) * 2.0


def _decode_minifloat(code: int, exp_bits: int, man_bits: int, bias: int) -> float:
    """Finite value of a sign/exponent/mantissa code; exponent field 0 is subnormal."""
    if not 0 <= code < 1 << (1 + exp_bits + man_bits):
        raise ValueError(f"code {code} does not fit in {1 + exp_bits + man_bits} bits")
    sign = -1.0 if code >> (exp_bits + man_bits) else 1.0
    exp = (code >> man_bits) & ((1 << exp_bits) - 1)
    man = code & ((1 << man_bits) - 1)
    if exp == 0:
        return sign * math.ldexp(man / (1 << man_bits), 1 - bias)
    return sign * math.ldexp(1.0 + man / (1 << man_bits), exp - bias)


def decode_e4m3fn_bits(code: int) -> float:
    """Value of an e4m3fn byte: 1-4-3, bias 7, no inf, S.1111.111 = NaN."""
    if 0 <= code < 256 and code & 0x7F == 0x7F:
        return math.nan
    return _decode_minifloat(code, 4, 3, 7)


def decode_e5m2_bits(code: int) -> float:
    """Value of an e5m2 byte: 1-5-2, bias 15, IEEE inf (S.11111.00) and NaN (other mantissas)."""
    if 0 <= code < 256 and (code >> 2) & 0x1F == 0x1F:
        if code & 0x3:
            return math.nan
        return -math.inf if code & 0x80 else math.inf
    return _decode_minifloat(code, 5, 2, 15)
