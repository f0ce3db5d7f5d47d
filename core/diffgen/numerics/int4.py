"""Signed int4 (W4A4, SVDQuant int4): two's-complement nibbles, two per byte along K.

    values in [-8, 7];  nibble = value & 0xF;  byte = nibble[..., 2i] | nibble[..., 2i+1] << 4
    value = nibble - 16 if nibble >= 8 else nibble                     (sign extension)

Same nibble order as E2M1 packing: the even element sits in the low nibble.
"""

from __future__ import annotations

import torch


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [..., K] -> uint8 [..., K/2]."""
    if values.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(values.shape)}")
    if values.numel():
        lo, hi = int(values.min()), int(values.max())
        if lo < -8 or hi > 7:
            raise ValueError(f"pack_int4 needs values in [-8, 7], found min {lo}, max {hi}")
    nibbles = (values.to(torch.int16) & 0x0F).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 or int8 bytes [..., K/2] -> sign-extended int8 [..., K]."""
    packed = packed.view(torch.uint8)  # int8 would make >> sign-extend the high nibble early
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).to(torch.int16)
    values = nibbles - ((nibbles & 0x08) << 1)  # subtract 16 where the sign bit is set
    return values.to(torch.int8).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
