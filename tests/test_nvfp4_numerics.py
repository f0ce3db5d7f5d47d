"""NVFP4 numerics against an independent decode of the bits (sign, exponent and mantissa fields
read from each nibble and from each E4M3 byte, no lookup table)."""

from __future__ import annotations

import math

import torch

from diffgen.numerics.fp8 import decode_e4m3fn_bits
from diffgen.numerics.nvfp4 import (dequantize_nvfp4, fake_quantize_nvfp4, linear_to_swizzled_scales,
                                    quantize_nvfp4, swizzled_to_linear_scales)


def e2m1_from_bits(code: int) -> float:
    """1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal (0.5 * m)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    magnitude = 0.5 * mantissa if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


def decode_by_hand(packed: torch.Tensor, scale: torch.Tensor, global_scale: float) -> torch.Tensor:
    rows, half = packed.shape
    out = torch.empty(rows, 2 * half, dtype=torch.float64)
    for n in range(rows):
        for byte_index in range(half):
            byte = int(packed[n, byte_index])
            for nibble, code in enumerate((byte & 0x0F, byte >> 4)):  # element 2i is the low nibble
                k = 2 * byte_index + nibble
                block = decode_e4m3fn_bits(int(scale[n, k // 16].view(torch.uint8)))
                out[n, k] = e2m1_from_bits(code) * block * global_scale
    return out


def test_dequantize_matches_the_bits():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (5, 24), dtype=torch.uint8, generator=g)
    scale = (torch.rand(5, 3, generator=g) * 4 + 0.01).to(torch.float8_e4m3fn)
    global_scale = torch.tensor(0.0123)
    got = dequantize_nvfp4(packed, scale, global_scale, dtype=torch.float64)
    assert torch.allclose(got, decode_by_hand(packed, scale, float(global_scale)), rtol=1e-6, atol=0)


def test_quantize_rounds_each_value_to_a_nearest_representable_one():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 40, generator=g) * 3
    packed, scale, global_scale = quantize_nvfp4(w)
    assert packed.shape == (7, 24) and scale.shape == (7, 3)  # K = 40 padded to 48
    deq = dequantize_nvfp4(packed, scale, global_scale, k=40)
    assert math.isclose(float(global_scale), float(w.abs().max()) / (6 * 448), rel_tol=1e-6)
    # Every value is within half a step of the E2M1 grid at its block's scale: the grid's widest
    # step is 2 (between 4 and 6), so |error| <= 1 * block scale * global scale.
    step = scale.float().repeat_interleave(16, dim=1)[:, :40] * global_scale
    assert ((deq - w).abs() <= step * 1.0 + 1e-7).all()
    # and the per-block largest magnitude is reproduced to within E4M3's rounding of the scale
    assert (deq - w).abs().max() < 0.35 * w.abs().max()


def test_zero_blocks_and_exact_values_survive():
    w = torch.zeros(2, 32)
    w[0, :16] = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 6])
    packed, scale, global_scale = quantize_nvfp4(w, torch.tensor(2.0 ** -7))  # block scale 128, exact in E4M3
    assert torch.equal(dequantize_nvfp4(packed, scale, global_scale), w)


def test_fake_quantized_activations_keep_their_shape_and_dtype():
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    y = fake_quantize_nvfp4(x, torch.tensor(float(x.abs().max()) / (6 * 448)))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.nn.functional.cosine_similarity(y.float().flatten(), x.float().flatten(), dim=0) > 0.98


def test_swizzle_places_each_scale_where_the_tiled_layout_says():
    rows, cols = 200, 6
    scale = torch.arange(rows * cols, dtype=torch.int32).reshape(rows, cols)
    tiled = linear_to_swizzled_scales(scale)
    assert tiled.shape == (256, 8)
    flat = tiled.reshape(-1)
    tiles_per_row_block = 8 // 4
    for r, c in [(0, 0), (1, 0), (31, 3), (32, 0), (127, 5), (128, 4), (199, 5)]:
        i, rest = divmod(r, 128)
        j, t = divmod(rest, 32)
        l, m = divmod(c, 4)
        offset = (i * tiles_per_row_block + l) * 512 + t * 16 + j * 4 + m
        assert int(flat[offset]) == int(scale[r, c]), (r, c)
    assert torch.equal(swizzled_to_linear_scales(tiled, rows, cols), scale)
