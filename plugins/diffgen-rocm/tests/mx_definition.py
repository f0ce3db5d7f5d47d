"""MXFP4 written again from its definition (OCP MX v1.0; Quark's and aiter's "even" scale rule),
for the tests to hold the plugin against. Deliberately shares no code with diffgen.numerics or the
plugin: the element grid is searched by distance, the scale comes from torch.frexp.

    value = E2M1[code & 7] * (-1 if code & 8) * 2^(scale_byte - 127)     per group of 32 along K
    code 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6; byte = code[2i] | code[2i+1] << 4
    "even" scale: amax = m * 2^e (m in [1, 2)); e += 1 when m >= 1.75; scale exponent = e - 2
"""

from __future__ import annotations

import torch

MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def decode_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> E2M1 values [..., K] (fp32)."""
    low = (packed & 0x0F).long()
    high = (packed >> 4).long()
    codes = torch.stack([low, high], dim=-1).flatten(-2)
    values = MAGNITUDES[codes & 7]
    return torch.where(codes >= 8, -values, values)


def decode_mxfp4(packed: torch.Tensor, scale_bytes: torch.Tensor, k: int | None = None) -> torch.Tensor:
    values = decode_codes(packed)
    scales = torch.pow(2.0, scale_bytes.double() - 127).float().repeat_interleave(32, dim=-1)
    out = values * scales
    return out if k is None else out[..., :k]


def even_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(amax.double())  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    e = exponent - 1  # amax = (2 * mantissa) * 2^e
    e = torch.where(2 * mantissa >= 1.75, e + 1, e)
    e = torch.where(amax == 0, torch.full_like(e, -127 + 2), e)
    return (e - 2).clamp(-127, 127)


def nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to the even code, saturating at +-6."""
    a = v.abs().clamp(max=6.0)
    distance = (a.unsqueeze(-1) - MAGNITUDES).abs()
    best = distance.min(dim=-1, keepdim=True).values
    tied = distance == best
    # among equally near magnitudes, the even code (mantissa bit 0) wins; else the only one
    even = tied & (torch.arange(8) % 2 == 0)
    index = torch.where(even.any(-1), even.float().argmax(-1), tied.float().argmax(-1))
    return torch.sign(v) * MAGNITUDES[index]


def fake_quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K a multiple of 32) rounded to MXFP4 with the even rule and back, in fp32."""
    groups = x.float().reshape(*x.shape[:-1], -1, 32)
    scale = torch.pow(2.0, even_scale_exponent(groups.abs().amax(-1, keepdim=True))).float()
    return (nearest_e2m1(groups / scale) * scale).reshape(x.shape)
