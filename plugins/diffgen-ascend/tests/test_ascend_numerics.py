"""The Ascend rounding rules against their definitions, written here with math and value tables
(msmodelslim_writer), at the edges: zero blocks, powers of two, saturation, exact ties."""

from __future__ import annotations

import math

import pytest
import torch

from diffgen.numerics.e2m1 import e2m1_to_float
from diffgen.numerics.e8m0 import e8m0_to_float
from diffgen_ascend import numerics
from msmodelslim_writer import E4M3_TABLE, e2m1_codes, e4m3_round, mx_fake, mx_weight


def test_log2_bounds_are_exact_at_powers_of_two_and_their_neighbours():
    values = [2.0 ** e for e in range(-20, 20)]
    values += [math.nextafter(v, 0) for v in values] + [math.nextafter(v, math.inf) for v in values]
    x = torch.tensor(values, dtype=torch.float32)
    for v, f, c in zip(x.tolist(), numerics.floor_log2(x).tolist(), numerics.ceil_log2(x).tolist()):
        assert f == math.floor(math.log2(v)) and c == math.ceil(math.log2(v)), v


@pytest.mark.parametrize("amax", [0.0, 1e-30, 0.75, 1.0, 5.999, 6.0, 6.5, 7.0, 7.25, 7.26, 448.0, 500.0, 3e37])
def test_scale_rules_follow_their_formulas(amax):
    a = torch.tensor([amax])
    exp = {r: int(numerics.shared_exponent(a, r, "e2m1")) for r in ("ocp", "minmax", "ceil_x", "npu_alg2")}
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731 - the rules compute in fp32
    if amax > 0:
        assert exp["ocp"] == math.floor(math.log2(amax)) - 2
        assert exp["npu_alg2"] == math.ceil(math.log2(f32(f32(amax) / 7.25)))
    else:
        assert exp["npu_alg2"] == -127  # an all-zero block: the smallest scale; its codes are 0 anyway
    assert exp["minmax"] == math.floor(math.log2(f32(f32(f32(amax) * 8) / 7 + 9.6e-7))) - 2
    assert exp["ceil_x"] == math.ceil(math.log2(f32(f32(amax) / 7.25 + 9.6e-7)))


def test_e8m0_bytes_clamp_to_the_encodable_range():
    assert numerics.exponent_to_e8m0(torch.tensor([-200, -127, 0, 127, 300])).tolist() == [0, 0, 127, 254, 254]


def test_e2m1_rounding_ties_even_and_away():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])
    assert torch.equal(numerics.round_e2m1(ties, "round"), e2m1_codes(ties, "away"))
    assert torch.equal(numerics.round_e2m1(ties, "rint"), e2m1_codes(ties, "even"))
    # away from zero: every tie takes the larger magnitude
    assert e2m1_to_float(numerics.round_e2m1(ties, "round")).abs().tolist() == [0.5, 1, 1.5, 2, 3, 4, 6, 0.5, 3, 6]
    saturating = torch.tensor([6.0, 6.5, 100.0, -1e30])
    assert e2m1_to_float(numerics.round_e2m1(saturating, "round")).tolist() == [6, 6, 6, -6]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3
    for mode, ties in (("round", "away"), ("rint", "even")):
        assert torch.equal(numerics.round_e2m1(x, mode), e2m1_codes(x, ties))


def test_e4m3_rounding_ties_even_and_away():
    mids = (E4M3_TABLE[1:] + E4M3_TABLE[:-1]) / 2  # every midpoint between neighbours is a tie
    x = torch.cat([mids, -mids, torch.tensor([448.0, 460.0, 1e9, -1e9])])
    for mode, ties in (("round", "away"), ("rint", "even")):
        assert torch.equal(numerics.round_e4m3(x, mode).view(torch.uint8), e4m3_round(x, ties).view(torch.uint8)), mode
    assert numerics.round_e4m3(torch.tensor([460.0]), "round").float().item() == 448.0  # saturates, no NaN


def test_mx_quantization_matches_msmodelslim_weight_export():
    """The writer's msmodelslim export (floor scales, half-away) is what quantize_mx gives with
    the same rules; zero blocks and a saturating block included."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 128, generator=g) * torch.logspace(-3, 3, 8)[:, None]
    w[0, :32] = 0  # a zero block
    w[1, :32] = 7.0 / 8 * 2 ** 5  # a block whose max lands on the 8/7 boundary
    q, s = numerics.quantize_mx(w, "e4m3", "ocp", "round")
    q_ref, s_ref = mx_weight(w, "e4m3")
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    codes, s4 = numerics.quantize_mx(w, "e2m1", "minmax", "round")
    codes_ref, s4_ref = mx_weight(w, "e2m1")
    assert torch.equal(s4, s4_ref) and torch.equal(codes, codes_ref)
    assert bool((e2m1_to_float(codes[0, :32]) == 0).all())


@pytest.mark.parametrize("element,rule,rounding,ref", [("e4m3", "ocp", "rint", ("floor", "even")),
                                                       ("e2m1", "npu_alg2", "round", ("ceil7.25", "away"))])
def test_activation_fake_quantization_matches_the_op_docs(element, rule, rounding, ref):
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(2)) * 5
    x[2] = 0
    x[3, :32] = 1e-3
    expected = mx_fake(x, element, *ref)
    assert torch.equal(numerics.fake_quantize_mx(x, element, rule, rounding), expected)


def test_dual_level_quantization_by_its_definition():
    x = torch.randn(3, 1024 + 64, generator=torch.Generator().manual_seed(3))
    x[1, :512] = 0  # a zero level-0 block stays zero
    codes, l0, l1 = numerics.dual_level_quantize(x)
    assert codes.shape == (3, 1088) and l0.shape == (3, 3) and l1.shape == (3, 34)
    for r in range(3):
        for b in range(3):
            block = x[r, 512 * b: 512 * (b + 1)]
            assert l0[r, b].item() == pytest.approx(block.abs().max().item() / 6, rel=1e-7)
    t = x[0, :32] / l0[0, 0]
    assert l1[0, 0].item() == math.floor(math.log2(t.abs().max().item())) - 2 + 127
    back = numerics.dual_level_dequantize(codes, l0, l1, x.shape[1])
    assert bool((back[1, :512] == 0).all())
    # The OCP floor scale puts a 32-block's max in [4, 8) units of u = 2^l1 * l0: below 6 the error is
    # at most half the top E2M1 step (2u / 2 = u), above 6 saturation costs up to 2u.
    u = e8m0_to_float(l1).repeat_interleave(32, 1)[:, : x.shape[1]] * l0.repeat_interleave(512, 1)[:, : x.shape[1]]
    err = (back - x).abs()
    assert bool((err <= 2 * u + 1e-6).all())
    assert bool((err[x.abs() < 6 * u] <= u[x.abs() < 6 * u] + 1e-6).all())
