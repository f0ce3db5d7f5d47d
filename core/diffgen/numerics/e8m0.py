"""OCP MX v1.0: blocks of 32 elements along K sharing one E8M0 (power of two) scale.

Tensors: ``elements`` [..., K] (uint8 E2M1 codes, unpacked, or float8 e4m3fn / e5m2) and
``scales`` uint8 [..., K/32]. Byte b encodes 2^(b - 127) (0x00 = 2^-127, 0xFE = 2^127,
0xFF = NaN; there is no zero). Per block, with emax_elem the exponent of the element's
largest binade (E2M1: 2, E4M3: 8, E5M2: 15):

    shared_exp = floor(log2(amax)) - emax_elem          stored as shared_exp + 127, in [0, 254]
    P_i = element(clamp(V_i / 2^shared_exp, -max, max))  round to nearest even, saturate
    V_i ~= P_i * 2^shared_exp

This is the spec's round-down ("floor") scale; kernels using the ceil or even variants pick a
scale one binade higher for some blocks, so their bytes differ from these.
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


def quantize_mx(
    x: torch.Tensor, element: str, block: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (elements [..., K], scales uint8 [..., K/block]) by the OCP floor rule."""
    emax_elem, dtype = _element_spec(element)
    xb = _blocks(x.float(), block)
    scales = mx_shared_exponent_scale(xb.abs().amax(dim=-1), emax_elem)
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
