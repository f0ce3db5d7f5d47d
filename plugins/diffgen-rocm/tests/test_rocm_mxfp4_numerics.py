"""MXFP4 numerics: the scale rules added to diffgen.numerics.e8m0 and the plugin's quantize /
dequantize, against the definition written independently in mx_definition.py."""

from __future__ import annotations

import math

import pytest
import torch

from diffgen.numerics.e8m0 import mx_scale, mx_shared_exponent_scale, quantize_mx
from diffgen_rocm.mxfp4 import dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4

import mx_definition as mx


def _cases() -> torch.Tensor:
    """Block maxima around every binade edge of the rules: 1.5, 1.74, 1.75, 1.99, 2, 6, 6.01 times
    powers of two, zero, an fp32 subnormal, and the extremes."""
    base = torch.tensor([1.0, 1.5, 1.74, 1.75, 1.99, 3.0, 6.0, 6.01])
    scaled = torch.cat([base * 2.0 ** e for e in (-20, -3, 0, 5, 30)])
    return torch.cat([scaled, torch.tensor([0.0, 1e-40, 2.0 ** 127, 3e38])])


def test_even_rule_is_quarks_mantissa_rounding():
    amax = _cases()
    expected = []
    for a in amax.tolist():
        if a == 0:
            expected.append(0)
            continue
        mantissa, exponent = math.frexp(a)  # a = mantissa * 2^exponent, mantissa in [0.5, 1)
        e = exponent - 1 + (2 * mantissa >= 1.75)
        expected.append(min(max(e - 2 + 127, 0), 254))
    assert mx_scale(amax, "e2m1", "even").tolist() == expected


def test_rceil_rule_never_saturates_and_floor_is_unchanged():
    amax = _cases()[:-2]  # keep amax / 6 a normal number
    rceil = mx_scale(amax, "e2m1", "rceil")
    for a, byte in zip(amax.tolist(), rceil.tolist()):
        if a == 0:
            assert byte == 0
            continue
        assert a / 2.0 ** (byte - 127) <= 6.0  # the block max fits without saturating
        assert a / 2.0 ** (byte - 128) > 6.0 or byte == 0  # and it is the smallest such scale
    assert torch.equal(mx_scale(amax, "e2m1", "floor"), mx_shared_exponent_scale(amax, 2))
    x = torch.randn(4, 64)
    assert all(torch.equal(a, b) for a, b in zip(quantize_mx(x, "e2m1"), quantize_mx(x, "e2m1", rounding="floor")))
    with pytest.raises(ValueError, match="rounding"):
        mx_scale(amax, "e2m1", "nearest")


@pytest.mark.parametrize("k", [64, 96, 80])
def test_quantize_then_dequantize_equals_the_definition(k):
    torch.manual_seed(k)
    # Groups with very different magnitudes, and maxima placed on the even rule's edges.
    w = torch.randn(8, k) * torch.logspace(-4, 2, 8)[:, None]
    w[0, 0] = 1.75 * 4
    w[1, 0] = 1.74 * 4
    packed, scales = quantize_mxfp4(w, "even")
    assert packed.shape == (8, -(-k // 32) * 16) and scales.shape == (8, -(-k // 32))
    padded = torch.nn.functional.pad(w, (0, -k % 32))
    expected = mx.fake_quantize_mxfp4(padded)[:, :k]
    # Exact: both compute power-of-two scalings and pick grid points; no rounding in between.
    assert torch.equal(dequantize_mxfp4(packed, scales, k), expected)
    assert torch.equal(mx.decode_mxfp4(packed, scales, k), expected)
    assert torch.equal(fake_quantize_mxfp4(w, "even"), expected)


def test_ties_go_to_the_even_code_and_values_saturate_at_six():
    # scale 2^0 (amax 6 -> byte 127 under the even rule: 6 = 1.5 * 2^2, no carry)
    row = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.1] + [0.0] * 22)
    got = dequantize_mxfp4(*quantize_mxfp4(row[None]))[0, :10]
    assert got.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 0.0]
    # amax 7 rounds up to the 2^3 binade (scale 2): 7 -> 3.5 -> 4 (code ties to even) -> 8
    assert dequantize_mxfp4(*quantize_mxfp4(torch.tensor([[7.0] + [0.0] * 31])))[0, 0].item() == 8.0


def test_zero_is_stored_as_positive_zero():
    packed, _ = quantize_mxfp4(torch.tensor([[-1e-6, 1.0] + [0.0] * 30]))
    assert packed[0, 0].item() & 0x0F == 0  # code 0, not 8 (-0), as Quark writes it
