"""The number rules of the Ascend stack that differ from the OCP defaults in ``diffgen.numerics``.

MX scale exponents (shared_exp; the E8M0 byte is shared_exp + 127, clamped to [0, 254]) over a
block's amax, as each producer computes them:

  ocp            floor(log2(amax)) - emax          NPU scale_alg=0, msmodelslim MXFP8 weights
  minmax         floor(log2(amax * 8/7 + 9.6e-7)) - 2    msmodelslim MXFP4 "minmax" weights
  ceil_x(c)      ceil(log2(amax / c + 9.6e-7))     msmodelslim MXFP4 "ceil_x" weights (c = 7.25)
  npu_alg2(c)    ceil(log2(amax / c))              npu_dynamic_mx_quant(scale_alg=2,
                                                   dst_type_max=c), c in (6, 12]; SGLang uses 7.25

Element rounding: ``rint`` is round-half-to-even (torch_npu's default, the casts of torch);
``round`` is round-half-away-from-zero (msmodelslim's sign * floor(|a| + 0.5), and torch_npu's
round_mode="round"). Both saturate at the element's largest value (6 for E2M1, 448 for E4M3).

Dual-level MXFP4 (npu_dynamic_dual_level_mx_quant, W4A4_MXFP4_DUALSCALE): per 512-block
l0 = amax / 6 (fp32); t = (x / l0) rounded to x's dtype; per 32-block of t an OCP scale l1;
codes = E2M1(t / 2^l1). Value = code * 2^l1 * l0. A zero 512-block gets l0 = 0 and zero codes
(the op's behaviour there is not documented; this choice keeps zeros zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.numerics.e2m1 import float_to_e2m1
from diffgen.numerics.e8m0 import e8m0_to_float
from diffgen.numerics.fp8 import FP8_E4M3_MAX

MX_BLOCK = 32
DUAL_BLOCK = 512
EMAX = {"e2m1": 2, "e4m3": 8}
_EPS = 9.6e-7  # msmodelslim's guard against log2(0)
# E2M1 midpoints between neighbouring magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) for x > 0, exact (read from the fp32 exponent field); subnormals and 0 give -127."""
    field = (x.float().view(torch.int32) >> 23) & 0xFF
    return field.to(torch.int32) - 127


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) for x > 0, exact: one binade up unless x is a power of two."""
    bits = x.float().view(torch.int32)
    return floor_log2(x) + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def shared_exponent(amax: torch.Tensor, rule: str, element: str = "e2m1", c: float = 7.25) -> torch.Tensor:
    """int32 shared exponent of blocks with maximum ``amax`` under ``rule`` (module docstring)."""
    amax = amax.float()
    if rule == "ocp":
        return floor_log2(amax) - EMAX[element]
    if rule == "minmax":
        return floor_log2(amax * 8 / 7 + _EPS) - 2
    if rule == "ceil_x":
        return ceil_log2(amax / c + _EPS)
    if rule == "npu_alg2":
        if not 6 < c <= 12:
            raise ValueError(f"scale_alg=2 is implemented for dst_type_max in (6, 12], not {c}")
        exp = ceil_log2(amax / c)
        return torch.where(amax > 0, exp, torch.full_like(exp, -127))
    raise ValueError(f"unknown MX scale rule {rule!r}")


def exponent_to_e8m0(exp: torch.Tensor) -> torch.Tensor:
    return (exp + 127).clamp(0, 254).to(torch.uint8)


def round_e2m1(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """fp32 -> E2M1 codes (uint8, sign in bit 3), saturating at 6."""
    if rounding == "rint":
        return float_to_e2m1(x)
    if rounding != "round":
        raise ValueError(f"unknown rounding {rounding!r}")
    a = x.float().abs()
    mids = torch.tensor(_E2M1_MIDPOINTS, device=a.device)
    mag = torch.bucketize(a, mids, right=True)  # a tie passes its midpoint: away from zero
    mag = torch.where(torch.isnan(a), torch.zeros_like(mag), mag)
    return (mag + torch.where(x < 0, 8, 0)).to(torch.uint8)


def round_e4m3(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, saturating at 448."""
    x = x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    nearest = x.to(torch.float8_e4m3fn)  # round half to even
    if rounding == "rint":
        return nearest
    if rounding != "round":
        raise ValueError(f"unknown rounding {rounding!r}")
    a = x.abs()
    code = nearest.view(torch.uint8) & 0x7F  # magnitude codes 0..0x7E are monotonic in value
    below = nearest.float().abs() < a  # then the tie partner lies one code up, else one down
    other = torch.where(below, (code + 1).clamp(max=0x7E), code.to(torch.int16).sub(1).clamp(min=0).to(torch.uint8))
    other_value = other.view(torch.float8_e4m3fn).float()
    tie = (other_value - a).abs() == (nearest.float().abs() - a).abs()
    away = torch.where(tie & (other_value > nearest.float().abs()), other, code)
    return (away | torch.where(x < 0, 0x80, 0).to(torch.uint8)).view(torch.float8_e4m3fn)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., K] -> [..., ceil(K/block), block], zero-padded."""
    pad = -x.shape[-1] % block
    x = F.pad(x, (0, pad)) if pad else x
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quantize_mx(x: torch.Tensor, element: str, rule: str, rounding: str, c: float = 7.25
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (elements [..., Kp] (E2M1 codes uint8 or float8_e4m3fn), scales uint8 [..., Kp/32]);
    Kp is K rounded up to 32, the padding zeros."""
    xb = _blocks(x.float(), MX_BLOCK)
    scales = exponent_to_e8m0(shared_exponent(xb.abs().amax(-1), rule, element, c))
    scaled = xb / e8m0_to_float(scales)[..., None]  # dividing by a power of two is exact
    elements = round_e2m1(scaled, rounding) if element == "e2m1" else round_e4m3(scaled, rounding)
    return elements.reshape(*x.shape[:-1], -1), scales


def dequantize_mx(elements: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """elements [..., Kp] (E2M1 codes or float8) * 2^(scale - 127) per 32 -> fp32 [..., in_features]."""
    from diffgen.numerics.e2m1 import e2m1_to_float

    values = e2m1_to_float(elements) if elements.dtype == torch.uint8 else elements.float()
    values = _blocks(values, MX_BLOCK)[..., : scales.shape[-1], :]
    out = (values * e8m0_to_float(scales)[..., None]).reshape(*values.shape[:-2], -1)
    return out[..., :in_features]


def fake_quantize_mx(x: torch.Tensor, element: str, rule: str, rounding: str, c: float = 7.25) -> torch.Tensor:
    """x quantized to MX and back (fp32, x's shape)."""
    elements, scales = quantize_mx(x, element, rule, rounding, c)
    return dequantize_mx(elements, scales, x.shape[-1])


def dual_level_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] (its dtype is the cast dtype of t) -> (E2M1 codes uint8 [..., Kp], l0 fp32
    [..., ceil(K/512)], l1 uint8 [..., Kp/32]) with Kp = K rounded up to 32."""
    blocks = _blocks(x.float(), DUAL_BLOCK)
    l0 = blocks.abs().amax(-1) / 6.0
    safe = torch.where(l0 > 0, l0, torch.ones_like(l0))
    t = (blocks / safe[..., None]).to(x.dtype).float()
    t = t.reshape(*x.shape[:-1], -1)
    codes, l1 = quantize_mx(t, "e2m1", "ocp", "rint")
    kp = -(-x.shape[-1] // MX_BLOCK) * MX_BLOCK
    return codes[..., :kp], l0, l1[..., : kp // MX_BLOCK]


def dual_level_dequantize(codes: torch.Tensor, l0: torch.Tensor, l1: torch.Tensor, in_features: int) -> torch.Tensor:
    """code * 2^(l1 - 127) * l0 -> fp32 [..., in_features]; l0 [..., ceil(K/512)] (a trailing 1 is allowed)."""
    if l0.shape[-1] == 1 and l0.ndim == codes.ndim + 1:
        l0 = l0[..., 0]
    values = dequantize_mx(codes, l1, codes.shape[-1])
    blocks = _blocks(values, DUAL_BLOCK)[..., : l0.shape[-1], :] * l0.float()[..., None]
    return blocks.reshape(*values.shape[:-1], -1)[..., :in_features]


def fake_dual_level(x: torch.Tensor) -> torch.Tensor:
    codes, l0, l1 = dual_level_quantize(x)
    return dual_level_dequantize(codes, l0, l1, x.shape[-1])
