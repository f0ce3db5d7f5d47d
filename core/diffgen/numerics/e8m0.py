"""OCP MX v1.0: blocks of 32 elements along K sharing one E8M0 (power of two) scale.

Tensors: ``elements`` [..., K] (uint8 E2M1 codes, unpacked, or float8 e4m3fn / e5m2) and
``scales`` uint8 [..., K/32]. Byte b encodes 2^(b - 127) (0x00 = 2^-127, 0xFE = 2^127,
0xFF = NaN; there is no zero). Per block, with emax_elem the exponent of the element's
largest binade (E2M1: 2, E4M3: 8, E5M2: 15):

    shared_exp = floor(log2(amax)) - emax_elem          stored as shared_exp + 127, in [0, 254]
    P_i = element(clamp(V_i / 2^shared_exp, -max, max))  round to nearest even, saturate
    V_i ~= P_i * 2^shared_exp

This is the spec's round-down ("floor") scale, the default. Kernels use other rules, which pick a
scale one binade higher for some blocks (``quantize_mx(..., rounding=...)``, ``mx_scale``):

    "even"   amax's fp32 mantissa first rounded to the element's mantissa bits (half up), then
             floor(log2) - emax_elem: AMD Quark's MX export and aiter's dynamic_mxfp4_quant
             (E2M1: a block whose amax is >= 1.75 * 2^e gets the scale of 2^(e+1))
    "rceil"  ceil(log2(amax / max_normal)): never saturates (NVIDIA's and aiter's "RoundUp")
"""

from __future__ import annotations

import torch

from .e2m1 import e2m1_to_float, float_to_e2m1
from .fp8 import quantize_fp8

# element name -> (emax_elem, float8 dtype, or None for E2M1 codes in uint8)
_MX_ELEMENTS: dict[str, tuple[int, torch.dtype | None]] = {
    "e2m1": (2, None),
    "e4m3": (8, torch.float8_e4m3fn),
    "e5m2": (15, torch.float8_e5m2),
}
E8M0_NAN = 0xFF
# element name -> (mantissa bits, largest finite value), for the "even" and "rceil" scale rules
_MX_ELEMENT_BITS: dict[str, tuple[int, float]] = {
    "e2m1": (1, 6.0),
    "e4m3": (3, 448.0),
    "e5m2": (2, 57344.0),
}
SCALE_ROUNDINGS = ("floor", "even", "rceil")


def e8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> fp32 2^(b - 127); 0xFF -> NaN.

    Built as fp32 bit patterns rather than with pow/exp, so every value is exact, including
    0x00 = 2^-127, which is an fp32 subnormal (mantissa bit 22 set, exponent field 0).
    """
    b = b.view(torch.uint8).to(torch.int32)
    bits = torch.where(b == 0, 1 << 22, b << 23)  # b >= 1: exponent field b is 2^(b-127)
    bits = torch.where(b == E8M0_NAN, 0x7FC00000, bits)
    return bits.view(torch.float32)


def float_to_e8m0_floor(x: torch.Tensor) -> torch.Tensor:
    """uint8 floor(log2(|x|)) + 127, clamped to [0, 254]; NaN -> 0xFF.

    Read from the fp32 exponent field: exact where a float log2 can round up at 2^k - ulp.
    Zero and subnormals give 0, inf gives 254.
    """
    field = (x.float().view(torch.int32) >> 23) & 0xFF
    out = field.clamp(0, 254)
    return torch.where(torch.isnan(x), E8M0_NAN, out).to(torch.uint8)


def mx_shared_exponent_scale(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """OCP MX scale byte: floor(log2(amax)) - emax_elem + 127, clamped to [0, 254].

    amax == 0 gives byte 0 (2^-127, the smallest scale); a NaN amax gives 0xFF.
    """
    floor = float_to_e8m0_floor(amax).to(torch.int32)
    out = (floor - emax_elem).clamp(0, 254)
    return torch.where(floor == E8M0_NAN, E8M0_NAN, out).to(torch.uint8)


def _element_spec(element: str) -> tuple[int, torch.dtype | None]:
    if element not in _MX_ELEMENTS:
        raise ValueError(f"unknown MX element {element!r}; expected one of {sorted(_MX_ELEMENTS)}")
    return _MX_ELEMENTS[element]


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., K] -> [..., K/block, block]."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"MX needs the last dim to be a multiple of {block}, got {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], k // block, block)


def _exponent_field(x: torch.Tensor) -> torch.Tensor:
    """The biased fp32 exponent field of |x| (int32)."""
    return (x.float().abs().view(torch.int32) >> 23) & 0xFF


def mx_scale(amax: torch.Tensor, element: str, rounding: str = "floor") -> torch.Tensor:
    """The E8M0 scale byte of blocks whose largest magnitude is ``amax``, by ``rounding`` (one of
    SCALE_ROUNDINGS, see the module docstring); clamped to [0, 254], a NaN amax gives 0xFF.
    "floor" is :func:`mx_shared_exponent_scale`."""
    emax_elem, _ = _element_spec(element)
    if rounding == "floor":
        return mx_shared_exponent_scale(amax, emax_elem)
    mantissa_bits, max_normal = _MX_ELEMENT_BITS[element]
    a = amax.float().abs()
    if rounding == "even":
        # Add half a unit of the element's last mantissa bit, drop the mantissa: a carry moves the
        # block to the next binade. Integer ops on the bit pattern, so it is exact.
        bits = (a.view(torch.int32) + (1 << (22 - mantissa_bits))) & 0x7F800000
        exponent = ((bits >> 23) & 0xFF) - 127
        byte = exponent - emax_elem + 127
    elif rounding == "rceil":
        v = a / max_normal
        bits = v.view(torch.int32)
        field = _exponent_field(v)
        byte = field + ((bits & 0x7FFFFF) != 0).to(torch.int32)  # ceil(log2 v) + 127 for normal v
        # A subnormal v is below 2^-126: byte 1 when above 2^-127 (bit pattern 1 << 22), else 0.
        byte = torch.where(field == 0, (bits > (1 << 22)).to(torch.int32), byte)
    else:
        raise ValueError(f"unknown MX scale rounding {rounding!r}; expected one of {SCALE_ROUNDINGS}")
    return torch.where(torch.isnan(a), E8M0_NAN, byte.clamp(0, 254)).to(torch.uint8)


def quantize_mx(
    x: torch.Tensor, element: str, block: int = 32, *, rounding: str = "floor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (elements [..., K], scales uint8 [..., K/block]); the scale rule is the
    OCP floor by default, or ``rounding`` (see :func:`mx_scale`)."""
    emax_elem, dtype = _element_spec(element)
    xb = _blocks(x.float(), block)
    scales = mx_scale(xb.abs().amax(dim=-1), element, rounding)
    scaled = xb / e8m0_to_float(scales).unsqueeze(-1)  # division by a power of two is exact
    if dtype is None:
        elements = float_to_e2m1(scaled)  # saturates at +-6
    else:
        elements = quantize_fp8(scaled, 1.0, dtype)  # saturates at +-max
    return elements.reshape(x.shape), scales


def dequantize_mx(
    elements: torch.Tensor,
    scales: torch.Tensor,
    element: str,
    block: int = 32,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """elements [..., K] * 2^(scales[..., k // block] - 127) -> dtype [..., K]."""
    _, fp8_dtype = _element_spec(element)
    if elements.shape[-1] != scales.shape[-1] * block:
        raise ValueError(
            f"MX elements {tuple(elements.shape)} and scales {tuple(scales.shape)} disagree "
            f"for block {block}"
        )
    values = e2m1_to_float(elements) if fp8_dtype is None else elements.float()
    out = _blocks(values, block) * e8m0_to_float(scales).unsqueeze(-1)
    return out.reshape(elements.shape).to(dtype)
