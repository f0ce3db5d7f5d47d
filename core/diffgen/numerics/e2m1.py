"""FP4 E2M1, the element type of NVFP4 (16-element blocks) and MXFP4 (32-element blocks).

Code layout: bit 3 = sign, bits 2..1 = exponent (bias 1), bit 0 = mantissa; no inf, no NaN.

    magnitude codes 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6      (code 1 is the only subnormal)
    packed byte = code[..., 2i] | code[..., 2i+1] << 4      (even element in the low nibble)

The low-nibble-first packing is what ModelOpt, cuBLAS/CUTLASS, FlashInfer, msmodelslim, aiter
and torch.float4_e2m1fn_x2 use; ``swap_nibbles`` converts high-nibble-first exports.
"""

from __future__ import annotations

import torch

E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
E2M1_MAX = 6.0

# Midpoints between neighbouring magnitudes, split by where a tie goes under round-half-to-even:
# down to the even code (0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4) or up to it (0.75 -> 1,
# 1.75 -> 2, 3.5 -> 4). The code of |x| is the number of midpoints it has passed.
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to even mantissa) -> uint8 codes 0..15.

    |x| > 6 (and +-inf) saturates to +-6. The sign bit is set only for x < 0, so -0.0 gives
    code 0 while -0.1 (which rounds to zero) gives code 8 (-0). E2M1 has no NaN: NaN gives
    code 0; a NaN in a block also makes its amax, hence its scale, NaN.
    """
    a = x.float().abs()
    down = torch.tensor(_TIES_DOWN, dtype=a.dtype, device=a.device)
    up = torch.tensor(_TIES_UP, dtype=a.dtype, device=a.device)
    # bucketize(right=False) counts boundaries < a, right=True counts boundaries <= a.
    mag = torch.bucketize(a, down, right=False) + torch.bucketize(a, up, right=True)
    mag = torch.where(torch.isnan(a), torch.zeros_like(mag), mag)
    sign = torch.where(x < 0, 8, 0)
    return (mag + sign).to(torch.uint8)


def e2m1_to_float(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Table lookup: uint8 codes 0..15 -> values."""
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    return table[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K/2], element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dim, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] (uint8 or int8) -> uint8 codes [..., K]."""
    packed = packed.view(torch.uint8)  # int8 would make >> sign-extend
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Exchange the two nibbles of every byte (high-nibble-first <-> low-nibble-first)."""
    packed = packed.view(torch.uint8)
    return (packed >> 4) | (packed << 4)
