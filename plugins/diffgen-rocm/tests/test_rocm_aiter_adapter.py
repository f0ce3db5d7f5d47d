"""The aiter adapter (gfx950, not run): detection of the real aiter and the reasons when it cannot
run, and the argument preparation against the reference method, through a fake ``aiter`` built
from aiter's documented layouts. The real call is the ``rocm``-marked test at the end."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from diffgen.linear import QuantLinear
from diffgen.platform import Platform, detect_platform
from diffgen.quant import LayerSpec, QuantRequest
from diffgen_rocm import aiter_mxfp4, mxfp4
from diffgen_rocm.aiter_mxfp4 import AiterMxfp4Method, aiter_unavailable_reason, shuffle_e8m0_scales

import mx_definition as mx

GFX950 = Platform("rocm", "cuda:0", "AMD Instinct MI355X", gfx_arch="gfx950")


# -- a fake aiter, written from the documented API and layouts ------------------------------------
def _scale_tiles(rp: int, cp: int) -> tuple[int, ...]:
    return (rp // 32, 2, 16, cp // 8, 2, 4, 1)


def _unshuffle_scales(shuffled: torch.Tensor) -> torch.Tensor:
    rp, cp = shuffled.shape
    t = _scale_tiles(rp, cp)
    # the inverse of permute(0, 3, 5, 2, 4, 1, 6) applied to view(t)
    permuted = shuffled.reshape(t[0], t[3], t[5], t[2], t[4], t[1], t[6])
    return permuted.permute(0, 5, 3, 1, 4, 2, 6).reshape(rp, cp)


def _unshuffle_weight(w: torch.Tensor) -> torch.Tensor:
    n, kb = w.shape
    # shuffle_weight: view(-1, N/16, 16, Kb/32, 2, 16).permute(0, 1, 3, 4, 2, 5)
    return w.reshape(1, n // 16, kb // 32, 2, 16, 16).permute(0, 1, 4, 2, 3, 5).reshape(n, kb)


class FakeAiter:
    """dynamic_mxfp4_quant / shuffle_weight / gemm_a4w4 with aiter's shapes, computing the MX
    definition (mx_definition) and checking every argument the adapter passes."""

    def __init__(self):
        self.calls = []

    def dynamic_mxfp4_quant(self, x, scaling_mode="even", shuffle=False):
        assert scaling_mode == "even" and x.ndim == 2 and x.is_contiguous()
        m, k = x.shape
        groups = x.float().reshape(m, k // 32, 32)
        exponent = mx.even_scale_exponent(groups.abs().amax(-1))
        values = mx.nearest_e2m1(groups / torch.pow(2.0, exponent).float().unsqueeze(-1)).reshape(m, k)
        codes = (values.abs().unsqueeze(-1) == mx.MAGNITUDES).float().argmax(-1) + 8 * (values < 0)
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
        scales = (exponent + 127).to(torch.uint8)
        if shuffle:
            rp, cp = -(-m // 256) * 256, -(-(k // 32) // 8) * 8
            padded = torch.zeros(rp, cp, dtype=torch.uint8)
            padded[:m, : k // 32] = scales
            scales = padded.view(_scale_tiles(rp, cp)).permute(0, 3, 5, 2, 4, 1, 6).reshape(rp, cp)
        self.calls.append("dynamic_mxfp4_quant")
        return packed, scales

    def shuffle_weight(self, x, layout=(16, 16)):
        assert layout == (16, 16) and x.dtype == torch.uint8
        n, kb = x.shape
        self.calls.append("shuffle_weight")
        return x.view(-1, n // 16, 16, kb // 32, 2, 16).permute(0, 1, 3, 4, 2, 5).contiguous().view(n, kb)

    def gemm_a4w4(self, a, b, a_scale, b_scale, bias=None, dtype=torch.bfloat16, alpha=1.0, beta=0.0,
                  bpreshuffle=True):
        assert bpreshuffle and bias is None and a.dtype == b.dtype == torch.uint8
        m, n, k = a.shape[0], b.shape[0], 2 * a.shape[1]
        a_values = mx.decode_mxfp4(a, _unshuffle_scales(a_scale)[:m, : k // 32])
        b_values = mx.decode_mxfp4(_unshuffle_weight(b), _unshuffle_scales(b_scale)[:n, : k // 32])
        out = torch.zeros(-(-m // 32) * 32, n, dtype=dtype)  # rows padded to 32, as aiter allocates
        out[:m] = (a_values @ b_values.T).to(dtype)
        self.calls.append("gemm_a4w4")
        return out


@pytest.fixture
def fake_aiter(monkeypatch):
    fake = FakeAiter()
    modules = {"aiter": types.ModuleType("aiter"), "aiter.utility.fp4_utils": types.ModuleType("fp4_utils"),
               "aiter.ops.shuffle": types.ModuleType("shuffle"), "aiter.ops.gemm_op_a4w4": types.ModuleType("a4w4")}
    modules["aiter.utility.fp4_utils"].dynamic_mxfp4_quant = fake.dynamic_mxfp4_quant
    modules["aiter.ops.shuffle"].shuffle_weight = fake.shuffle_weight
    modules["aiter.ops.gemm_op_a4w4"].gemm_a4w4 = fake.gemm_a4w4
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


def test_shuffled_scales_unshuffle_to_the_plain_ones():
    scales = torch.randint(100, 140, (300, 12), dtype=torch.uint8)
    shuffled = shuffle_e8m0_scales(scales)
    assert shuffled.shape == (512, 16)
    restored = _unshuffle_scales(shuffled)
    assert torch.equal(restored[:300, :12], scales) and (restored[300:] == 127).all()


def _layer(method_cls, weight, bias, dtype=torch.bfloat16):
    config = mxfp4.online_claim(type("S", (), {"tensors": {}, "config": {}})(), QuantRequest("mxfp4")).config
    spec = LayerSpec("blocks.0.ff", weight.shape[1], weight.shape[0], bias is not None, dtype)
    layer = QuantLinear(spec, method_cls(config, spec), dtype=dtype)
    layer.weight.data = weight.to(dtype)
    layer.bias.data = bias.to(dtype)
    layer.method.process_weights_after_loading(layer)
    return layer


def test_adapter_hands_aiter_what_computes_the_reference(fake_aiter):
    torch.manual_seed(0)
    weight, bias = torch.randn(272, 192) * 0.05, torch.randn(272)
    x = torch.randn(2, 37, 192)  # 74 rows: padded by aiter, cut by the adapter
    adapter = _layer(AiterMxfp4Method, weight, bias)
    reference = _layer(mxfp4.Mxfp4ReferenceMethod, weight, bias)
    assert adapter.weight.shape == (272, 96) and adapter.weight_scale.shape == (512, 8)
    got = adapter(x.bfloat16())
    expected = reference(x.bfloat16())
    assert fake_aiter.calls == ["shuffle_weight", "dynamic_mxfp4_quant", "gemm_a4w4"]
    assert got.shape == expected.shape == (2, 37, 272) and got.dtype == torch.bfloat16
    # Both sum the same fp32 products in a different order, and the adapter adds the bias after
    # rounding to bf16: within two bf16 ulps of the output's scale.
    assert torch.allclose(got.float(), expected.float(), rtol=2 ** -7, atol=2 ** -7 * expected.abs().max().item())


def test_reasons_say_why_aiter_cannot_run(monkeypatch):
    layer = LayerSpec("blocks.0.ff", 512, 512, True, torch.bfloat16)
    assert "this device is cpu" in aiter_unavailable_reason(layer, Platform("cpu", "cpu", "cpu"))
    mi300 = Platform("rocm", "cuda:0", "MI300X", gfx_arch="gfx942")
    assert "needs gfx950 (MI350/MI355X); this GPU is gfx942" in aiter_unavailable_reason(layer, mi300)
    monkeypatch.setitem(sys.modules, "aiter", None)  # not installed
    assert "github.com/ROCm/aiter" in aiter_unavailable_reason(layer, GFX950)
    # PyPI's unrelated "aiter" (async iterator helpers) imports, but has none of the API
    monkeypatch.setitem(sys.modules, "aiter", types.ModuleType("aiter"))
    reason = aiter_unavailable_reason(layer, GFX950)
    assert "not ROCm's aiter" in reason and "unrelated" in reason


def test_shape_and_scheme_reasons(fake_aiter):
    assert aiter_unavailable_reason(LayerSpec("a", 512, 512, True, torch.bfloat16), GFX950) is None
    assert "below N=256" in aiter_unavailable_reason(LayerSpec("a", 512, 128, True, torch.bfloat16), GFX950)
    assert "K by 64" in aiter_unavailable_reason(LayerSpec("a", 96, 512, True, torch.bfloat16), GFX950)
    assert "bf16 or fp16" in aiter_unavailable_reason(LayerSpec("a", 512, 512, True, torch.float32), GFX950)
    assert "keeps them 16-bit" in aiter_unavailable_reason(LayerSpec("a", 512, 512, True, torch.bfloat16),
                                                           GFX950, "w4a16")


def test_plugin_report_names_each_kernel_and_its_reason():
    from diffgen_rocm.plugin import check_platform

    report = check_platform(Platform("cpu", "cpu", "cpu")).to_dict()["kernels"]
    names = [k["name"].split()[0] for k in report]
    assert names == ["mxfp4-aiter-a4w4", "mxfp4-packed4", "mxfp4-packed4-w4a8", "rocm-fp8-fnuz", "mxfp4-reference"]
    assert all(k["reason"] for k in report) and [k["available"] for k in report] == [False, False, False, False, True]


def _on_gfx950() -> str | None:
    try:
        platform = detect_platform()
    except Exception as exc:  # noqa: BLE001
        return str(exc)
    return aiter_mxfp4.aiter_platform_reason(platform)


@pytest.mark.rocm
@pytest.mark.skipif(_on_gfx950() is not None, reason=f"needs a gfx950 GPU with ROCm's aiter: {_on_gfx950()}")
def test_real_aiter_matches_the_reference_on_gfx950():
    torch.manual_seed(0)
    weight, bias = torch.randn(512, 1024) * 0.05, torch.randn(512)
    x = torch.randn(300, 1024, dtype=torch.bfloat16)
    adapter = _layer(AiterMxfp4Method, weight.cuda(), bias.cuda())
    reference = _layer(mxfp4.Mxfp4ReferenceMethod, weight, bias)
    got, expected = adapter(x.cuda()).float().cpu(), reference(x).float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.999
