"""Unpack is proven bit-exact against packers written independently from the documented layout
(svdq_writer computes each element's storage index arithmetically; the plugin reshapes)."""

import torch

from diffgen_nunchaku import packing
from svdq_writer import pack_awq, pack_fp4_scales, pack_lowrank, pack_qweight, pack_scales

N, K, R = 256, 384, 32


def _codes(seed, shape=(N, K)):
    return torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed))


def test_int4_and_fp4_qweight_unpack_bit_exact():
    for seed in (0, 1):  # the nibble layout is the same for int4 and E2M1 codes
        codes = _codes(seed)
        plain = packing.unpack_qweight(pack_qweight(codes))
        assert torch.equal(packing.plain_to_nibbles(plain), codes.int())
        assert torch.equal(packing.pack_qweight(plain), pack_qweight(codes))


def test_int4_group64_scales_and_vectors():
    scales = torch.randn(N, K // 64).to(torch.bfloat16)
    assert torch.equal(packing.unpack_scales(pack_scales(scales)), scales)
    assert torch.equal(packing.pack_scales(scales), pack_scales(scales))
    bias = torch.randn(N).to(torch.bfloat16)
    assert torch.equal(packing.unpack_vector(pack_scales(bias[:, None]).reshape(-1)), bias)


def test_nvfp4_e4m3_scales_per_16():
    fp8 = (torch.rand(N, K // 16) * 400).to(torch.float8_e4m3fn)
    out = packing.unpack_fp4_scales(pack_fp4_scales(fp8))
    assert out.dtype == torch.float8_e4m3fn and torch.equal(out.view(torch.uint8), fp8.view(torch.uint8))
    assert torch.equal(packing.pack_fp4_scales(fp8).view(torch.uint8), pack_fp4_scales(fp8).view(torch.uint8))


def test_lowrank_down_and_up():
    down, up = torch.randn(R, K).to(torch.bfloat16), torch.randn(N, R).to(torch.bfloat16)
    assert torch.equal(packing.unpack_lowrank(pack_lowrank(down, down=True), down=True), down)
    assert torch.equal(packing.unpack_lowrank(pack_lowrank(up, down=False), down=False), up)
    assert torch.equal(packing.pack_lowrank(down, down=True), pack_lowrank(down, down=True))
    assert torch.equal(packing.pack_lowrank(up, down=False), pack_lowrank(up, down=False))


def test_awq_tinychat_qweight():
    codes = _codes(3, (64, 192))
    plain = packing.unpack_awq_qweight(pack_awq(codes))
    assert torch.equal(packing.plain_to_nibbles(plain), codes.int())
    assert torch.equal(packing.pack_awq_qweight(plain), pack_awq(codes))


def test_meta_tensors_give_shapes():
    meta = torch.empty(N, K // 2, dtype=torch.int8, device="meta")
    out = packing.unpack_qweight(meta)
    assert out.shape == (N, K // 2) and out.dtype == torch.uint8
    assert packing.unpack_lowrank(torch.empty(K, R, device="meta"), down=True).shape == (R, K)
