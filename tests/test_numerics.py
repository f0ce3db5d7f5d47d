"""diffgen.numerics against the format definitions; exhaustive where the code space is small.

Error bounds used below (round to nearest, p mantissa bits): a value in the normal range is off
by at most half an ulp, i.e. 2^-(p+1) of its magnitude (e4m3: 2^-4, e5m2: 2^-3, e2m1: 2^-2);
below the smallest normal the error is at most half the smallest subnormal, in absolute terms
(e4m3: 2^-10, e5m2: 2^-17, e2m1: 0.25), times the scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffgen.numerics import (
    E2M1_MAX,
    E2M1_VALUES,
    FP8_E4M3_MAX,
    FP8_E5M2_MAX,
    decode_e4m3fn_bits,
    decode_e5m2_bits,
    dequantize_fp8,
    dequantize_fp8_block,
    dequantize_mx,
    e2m1_to_float,
    e8m0_to_float,
    float_to_e2m1,
    float_to_e8m0_floor,
    fp8_e4m3fn_to_e4m3fnuz,
    fp8_max,
    mx_shared_exponent_scale,
    pack_e2m1,
    pack_int4,
    per_channel_scale,
    per_tensor_scale,
    quantize_fp8,
    quantize_fp8_block,
    quantize_fp8_per_token,
    quantize_fp8_static,
    quantize_mx,
    swap_nibbles,
    unpack_e2m1,
    unpack_int4,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ALL_BYTES = torch.arange(256, dtype=torch.uint8)
# (relative half-ulp, absolute half min-subnormal, max) per element format; see module docstring.
BOUNDS = {E4M3: (2**-4, 2**-10, 448.0), E5M2: (2**-3, 2**-17, 57344.0), "e2m1": (2**-2, 0.25, 6.0)}
SLACK = 1 + 1e-6  # fp32 rounding of x / scale and q * scale


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_floats(a: list[float], b: list[float]) -> bool:
    """Equal element-wise, NaN equal to NaN, and -0.0 told apart from 0.0."""
    return all(
        (math.isnan(x) and math.isnan(y)) or (x == y and math.copysign(1, x) == math.copysign(1, y))
        for x, y in zip(a, b, strict=True)
    )


def assert_rounding_error(x: torch.Tensor, xd: torch.Tensor, scale: torch.Tensor, fmt) -> None:
    """|xd - x| within the rounding bound; values past the max must be saturated to +-max."""
    rel, sub, m = BOUNDS[fmt]
    scale = scale.expand_as(x)
    over = (x / scale).abs() > m
    bound = torch.maximum(rel * x.abs(), sub * scale) * SLACK
    assert ((xd - x).abs() <= bound)[~over].all()
    torch.testing.assert_close(xd[over], (m * scale * x.sign())[over], rtol=1e-6, atol=0)


# --- FP8 -----------------------------------------------------------------------------------


def test_decoders_on_known_codes():
    # Guards the decoders themselves, so they cannot share a mistake with torch.
    assert decode_e4m3fn_bits(0x7E) == 448.0 and decode_e4m3fn_bits(0xFE) == -448.0
    assert decode_e4m3fn_bits(0x08) == 2**-6 and decode_e4m3fn_bits(0x01) == 2**-9
    assert math.isnan(decode_e4m3fn_bits(0x7F)) and math.isnan(decode_e4m3fn_bits(0xFF))
    assert decode_e5m2_bits(0x7B) == 57344.0 and decode_e5m2_bits(0x01) == 2**-16
    assert decode_e5m2_bits(0x7C) == math.inf and decode_e5m2_bits(0xFC) == -math.inf
    assert math.isnan(decode_e5m2_bits(0x7D))
    assert fp8_max(E4M3) == FP8_E4M3_MAX and fp8_max(E5M2) == FP8_E5M2_MAX
    with pytest.raises(ValueError):
        decode_e4m3fn_bits(256)


@pytest.mark.parametrize("dtype, decode", [(E4M3, decode_e4m3fn_bits), (E5M2, decode_e5m2_bits)])
def test_all_fp8_codes_decode_as_the_format_defines(dtype, decode):
    torch_values = ALL_BYTES.view(dtype).float().tolist()
    assert same_floats(torch_values, [decode(c) for c in range(256)])


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_every_finite_fp8_value_round_trips_to_its_code(dtype):
    values = ALL_BYTES.view(dtype).float()
    finite = torch.isfinite(values)
    q = quantize_fp8(values[finite], 1.0, dtype)
    assert torch.equal(q.view(torch.uint8), ALL_BYTES[finite])


def test_quantize_fp8_saturates():
    q = quantize_fp8(torch.tensor([464.0, 500.0, 1e6, -1e6, math.inf]), 1.0)
    assert q.float().tolist() == [448.0, 448.0, 448.0, -448.0, 448.0]
    assert quantize_fp8(torch.tensor([1e6]), 1.0, E5M2).float().item() == FP8_E5M2_MAX
    fnuz = quantize_fp8(torch.tensor([-1000.0]), 1.0, torch.float8_e4m3fnuz).float().item()
    assert fnuz == -240.0


def test_raw_fp8_cast_is_not_saturating():
    """Why quantize_fp8 clamps before casting."""
    assert torch.tensor(1e6).to(E5M2).float().isinf()
    assert torch.tensor(1000.0).to(torch.float8_e4m3fnuz).float().isnan()
    # e4m3fn: torch 2.11 (CPU and CUDA) gave NaN for |x| >= 464; the torch 2.13 CPU build this
    # suite was written on saturates to 448. quantize_fp8 must be right under either.
    raw = torch.tensor(500.0).to(E4M3).float().item()
    assert math.isnan(raw) or raw == 448.0


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_per_tensor_round_trip(dtype):
    x = torch.randn(64, 256, generator=gen()) * 3
    scale = per_tensor_scale(x, dtype)
    assert scale.shape == () and scale.dtype == torch.float32
    q = quantize_fp8(x, scale, dtype)
    assert q.dtype == dtype and q.float().abs().max() == fp8_max(dtype)  # amax lands on max
    assert_rounding_error(x, dequantize_fp8(q, scale), scale, dtype)
    torch.testing.assert_close(dequantize_fp8(q, scale.reshape(1)), dequantize_fp8(q, scale))


def test_per_channel_round_trip():
    # Rows six orders of magnitude apart: a per-tensor scale would flush the small ones.
    w = torch.randn(48, 96, generator=gen(1)) * torch.logspace(-3, 3, 48).unsqueeze(1)
    scale = per_channel_scale(w)
    assert scale.shape == (48,) and scale.dtype == torch.float32
    q = quantize_fp8(w, scale.unsqueeze(1))
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((48,), 448.0))
    wd = dequantize_fp8(q, scale)
    assert torch.equal(wd, dequantize_fp8(q, scale.unsqueeze(1)))
    assert_rounding_error(w, wd, scale.unsqueeze(1), E4M3)
    assert dequantize_fp8(q, scale, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_per_token_round_trip():
    x = torch.randn(2, 5, 64, generator=gen(2)) * torch.logspace(-2, 2, 5).view(1, 5, 1)
    x[1, 3] = 0.0
    q, scale = quantize_fp8_per_token(x)
    assert q.shape == x.shape and scale.shape == (2, 5, 1) and scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q[1, 3].float(), torch.zeros(64))
    assert_rounding_error(x, dequantize_fp8(q, scale), scale, E4M3)


def test_per_token_reciprocal_agrees_with_division():
    # x * (1 / s) vs the textbook x / s: they may differ in the last fp32 bit, which moves the FP8
    # rounding only for values within an ulp of a tie, i.e. almost never and then by one step.
    x = torch.randn(512, 2048, generator=gen(9)) * torch.logspace(-3, 3, 512).view(-1, 1)
    q, scale = quantize_fp8_per_token(x)
    by_division = quantize_fp8(x, scale)
    differ = q.view(torch.uint8) != by_division.view(torch.uint8)
    assert differ.sum() <= 5
    steps = (q.view(torch.uint8).int() - by_division.view(torch.uint8).int()).abs()
    assert steps.max() <= 1  # adjacent codes (same sign)


def test_static_activation_reciprocal_agrees_with_division():
    # The same rule for a static input scale (one reciprocal per tensor), over scales that are not
    # powers of two (those would make the two forms identical).
    x = torch.randn(256, 2048, generator=gen(10)) * 40
    for scale in (torch.tensor(3.7 / 448), torch.tensor(0.0917), torch.tensor(1e-3 / 7)):
        q = quantize_fp8_static(x, scale)
        by_division = quantize_fp8(x, scale)
        differ = q.view(torch.uint8) != by_division.view(torch.uint8)
        assert differ.sum() <= 5
        assert (q.view(torch.uint8).int() - by_division.view(torch.uint8).int()).abs().max() <= 1
    assert quantize_fp8_static(torch.tensor([1e6, -1e6]), torch.tensor(1.0)).float().tolist() == [448.0, -448.0]


def test_per_token_traces_without_reading_values():
    # Meta tensors have no values: .item() or `if tensor:` would raise, as under CUDA graphs.
    q, scale = quantize_fp8_per_token(torch.empty(3, 7, 64, device="meta", dtype=torch.bfloat16))
    assert q.shape == (3, 7, 64) and q.dtype == E4M3 and scale.shape == (3, 7, 1)


@pytest.mark.parametrize("shape, block", [((300, 200), (128, 128)), ((256, 128), (128, 128)),
                                          ((70, 90), (32, 64))])  # fmt: skip
def test_block_round_trip_with_edge_blocks(shape, block):
    w = torch.randn(*shape, generator=gen(3))
    w[: block[0], : block[1]] *= 1000  # one loud block must not hurt its neighbours
    q, scale_inv = quantize_fp8_block(w, block)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    assert q.shape == w.shape and q.dtype == E4M3 and scale_inv.shape == grid
    expand = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    expand = expand[: shape[0], : shape[1]]
    assert_rounding_error(w, dequantize_fp8_block(q, scale_inv, block), expand, E4M3)
    for i in range(grid[0]):  # each block's amax, partial edge blocks included, lands on 448
        for j in range(grid[1]):
            tile = q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            assert tile.float().abs().max() == 448.0


def test_block_scale_shape_mismatch_is_an_error():
    q, scale_inv = quantize_fp8_block(torch.randn(300, 200))
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        dequantize_fp8_block(q, scale_inv[:, :1])


def test_all_zero_inputs_give_zeros_and_finite_scales():
    z = torch.zeros(130, 140)
    scales = [per_tensor_scale(z), per_channel_scale(z), quantize_fp8_per_token(z)[1],
              quantize_fp8_block(z)[1]]  # fmt: skip
    for s in scales:
        assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(dequantize_fp8(quantize_fp8(z, scales[0]), scales[0]), z)
    assert torch.equal(dequantize_fp8(quantize_fp8(z, scales[1].unsqueeze(1)), scales[1]), z)
    q, s = quantize_fp8_block(z)
    assert torch.equal(dequantize_fp8_block(q, s), z)


def test_e4m3fn_to_e4m3fnuz_keeps_every_finite_value():
    fn = ALL_BYTES.view(E4M3)
    finite = torch.isfinite(fn.float())
    assert int(finite.sum()) == 254  # all but 0x7F and 0xFF
    scale = torch.tensor(0.37)
    q_fnuz, scale_fnuz = fp8_e4m3fn_to_e4m3fnuz(fn, scale)
    assert q_fnuz.dtype == torch.float8_e4m3fnuz and scale_fnuz.item() == pytest.approx(0.74)
    # Halving the code value and doubling the scale are exact, so the products are equal.
    assert torch.equal((q_fnuz.float() * scale_fnuz)[finite], (fn.float() * scale)[finite])
    assert q_fnuz.view(torch.uint8)[0x80] == 0
    assert not q_fnuz.float()[finite].isnan().any()
    assert fp8_e4m3fn_to_e4m3fnuz(fn, 1.5)[1].item() == 3.0


# --- E2M1 ----------------------------------------------------------------------------------


def e2m1_from_definition(code: int) -> float:
    """1 sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 8 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


def test_e2m1_table_matches_the_format():
    codes = torch.arange(16, dtype=torch.uint8)
    assert same_floats(list(E2M1_VALUES), [e2m1_from_definition(c) for c in range(16)])
    assert same_floats(e2m1_to_float(codes).tolist(), list(E2M1_VALUES))
    assert e2m1_to_float(codes, torch.bfloat16).dtype == torch.bfloat16
    assert E2M1_MAX == max(E2M1_VALUES)


def test_float_to_e2m1_hits_every_code():
    codes = float_to_e2m1(torch.tensor(E2M1_VALUES))
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [0] + list(range(1, 8)) + [0] + list(range(9, 16))  # -0.0 -> 0


def test_float_to_e2m1_ties_go_to_even_mantissa():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_to_float(float_to_e2m1(ties)).tolist() == expected
    assert e2m1_to_float(float_to_e2m1(-ties)).tolist() == [-v for v in expected]


def test_float_to_e2m1_saturates_and_signs():
    x = torch.tensor([6.0, 6.5, 7.0, 100.0, math.inf, -7.0, -math.inf])
    assert e2m1_to_float(float_to_e2m1(x)).tolist() == [6.0] * 5 + [-6.0] * 2
    assert float_to_e2m1(torch.tensor([-0.1, -0.0, 0.1, math.nan])).tolist() == [8, 0, 0, 0]


def test_float_to_e2m1_picks_a_nearest_value():
    x = (torch.rand(10_000, generator=gen(4)) - 0.5) * 16
    table = torch.tensor(E2M1_VALUES)
    nearest = (x.unsqueeze(1) - table).abs().min(dim=1).values
    got = e2m1_to_float(float_to_e2m1(x))
    assert torch.equal((got - x).abs(), nearest)  # random floats never hit an exact tie
    assert ((got == 0) | (got.sign() == x.sign())).all()


def test_pack_e2m1_low_nibble_is_the_even_element():
    codes = float_to_e2m1(torch.tensor([0.0, 0.5, -1.0, -6.0]))
    assert codes.tolist() == [0, 1, 10, 15]
    packed = pack_e2m1(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x10, 0xFA]
    assert swap_nibbles(packed).tolist() == [0x01, 0xAF]
    assert torch.equal(unpack_e2m1(packed.view(torch.int8)), codes)


def test_pack_e2m1_round_trip_and_odd_k():
    codes = torch.randint(0, 16, (3, 8, 64), generator=gen(5), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 8, 32)
    assert torch.equal(unpack_e2m1(packed), codes)
    assert torch.equal(swap_nibbles(swap_nibbles(packed)), packed)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        pack_e2m1(torch.zeros(2, 5, dtype=torch.uint8))


# --- E8M0 and MX ---------------------------------------------------------------------------


def test_all_e8m0_bytes_decode_exactly():
    values = e8m0_to_float(ALL_BYTES)
    assert values.dtype == torch.float32
    assert values[:255].double().tolist() == [2.0 ** (b - 127) for b in range(255)]
    assert values[0].item() == 2.0**-127  # an fp32 subnormal, not flushed to 0
    assert values[255].isnan()


def test_float_to_e8m0_floor():
    k = torch.arange(-126, 128)
    powers = torch.ldexp(torch.ones(254), k)
    assert torch.equal(float_to_e8m0_floor(powers).long(), k + 127)
    assert torch.equal(float_to_e8m0_floor(powers * 1.999).long(), k + 127)
    below = torch.nextafter(powers[1:], torch.zeros(253))  # 2^k - ulp has floor(log2) = k - 1
    assert torch.equal(float_to_e8m0_floor(below).long(), k[1:] + 126)
    edge = torch.tensor([0.0, 1e-45, 1e39, math.nan])  # zero, subnormal, inf, NaN
    assert float_to_e8m0_floor(edge).tolist() == [0, 0, 254, 255]


def test_mx_scale_rule_by_hand():
    amax = torch.tensor([5.0, 7.9, 8.0, 0.3, 0.0])
    # floor(log2 .) - 2 + 127: 5 -> 127, 7.9 -> 127, 8 -> 128, 0.3 -> -2 - 2 -> 123, 0 -> byte 0
    assert mx_shared_exponent_scale(amax, 2).tolist() == [127, 127, 128, 123, 0]
    assert mx_shared_exponent_scale(torch.tensor([448.0]), 8).tolist() == [127]
    assert mx_shared_exponent_scale(torch.tensor([1.0]), 15).tolist() == [112]


def test_quantize_mx_blocks_by_hand():
    x = torch.zeros(4, 32)
    x[0, 0], x[0, 1] = 7.9, -1.0  # scale 1: 7.9 saturates to 6
    x[1, 5], x[1, 6] = 5.0, 0.75  # scale 1: 5 ties to 4, 0.75 ties to 1
    x[2, 0] = 0.3  # scale 2^-4: 0.3 * 16 = 4.8 -> 4, i.e. 0.25
    elements, scales = quantize_mx(x.reshape(1, 128), "e2m1")
    assert scales.tolist() == [[127, 127, 123, 0]]  # an all-zero block gets the smallest scale
    xd = dequantize_mx(elements, scales, "e2m1").reshape(4, 32)
    assert xd[0, :2].tolist() == [6.0, -1.0] and xd[1, 5:7].tolist() == [4.0, 1.0]
    assert xd[2, 0].item() == 0.25 and torch.equal(xd[3], torch.zeros(32))


@pytest.mark.parametrize("element, fmt", [("e2m1", "e2m1"), ("e4m3", E4M3), ("e5m2", E5M2)])
def test_mx_round_trip(element, fmt):
    x = torch.randn(6, 256, generator=gen(6)) * torch.logspace(-4, 4, 6).unsqueeze(1)
    elements, scales = quantize_mx(x, element)
    assert elements.shape == x.shape and scales.shape == (6, 8) and scales.dtype == torch.uint8
    assert elements.dtype == (torch.uint8 if fmt == "e2m1" else fmt)
    # The scale byte follows the OCP rule, computed here with frexp: a = m * 2^e, m in [0.5, 1).
    emax = {"e2m1": 2, "e4m3": 8, "e5m2": 15}[element]
    amax = x.reshape(6, 8, 32).abs().amax(dim=-1).flatten().tolist()
    assert scales.flatten().tolist() == [math.frexp(a)[1] - 1 - emax + 127 for a in amax]
    per_elem = e8m0_to_float(scales).repeat_interleave(32, dim=1)
    assert_rounding_error(x, dequantize_mx(elements, scales, element), per_elem, fmt)


def test_mx_shape_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mx(torch.zeros(2, 48), "e2m1")
    with pytest.raises(ValueError, match="unknown MX element"):
        quantize_mx(torch.zeros(2, 32), "e3m2")
    with pytest.raises(ValueError, match="disagree"):
        dequantize_mx(torch.zeros(2, 64, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8),
                      "e2m1")  # fmt: skip


# --- int4 ----------------------------------------------------------------------------------


def test_int4_all_values_round_trip():
    values = torch.arange(-8, 8, dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (8,)
    unpacked = unpack_int4(packed)
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, values)
    assert torch.equal(unpack_int4(packed.view(torch.int8)), values)


def test_int4_bytes_by_hand():
    # 1 -> 0x1, -1 -> 0xF, -8 -> 0x8, 7 -> 0x7; even element in the low nibble.
    assert pack_int4(torch.tensor([1, -1, -8, 7], dtype=torch.int8)).tolist() == [0xF1, 0x78]


def test_int4_round_trip_and_errors():
    values = torch.randint(-8, 8, (4, 64), generator=gen(7), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    with pytest.raises(ValueError, match="max 8"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match="min -9"):
        pack_int4(torch.tensor([-9, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
