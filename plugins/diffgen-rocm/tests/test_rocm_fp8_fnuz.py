"""FP8 e4m3fnuz on MI300 (adapter, not run): the arguments prepared on the CPU give the same
dequantized weight, and the GEMM they feed, emulated in fp32, computes the builtin reference."""

from __future__ import annotations

import pytest
import torch

from diffgen.builtin.fp8 import online_config
from diffgen.builtin.fp8_methods import Fp8ReferenceMethod
from diffgen.linear import QuantLinear
from diffgen.platform import Platform, detect_platform
from diffgen.quant import LayerSpec, QuantConfig
from diffgen_rocm.fp8_fnuz import Fp8FnuzMethod, fnuz_platform_reason, fnuz_unavailable_reason
from diffgen_rocm.plugin import create_linear_method

MI300 = Platform("rocm", "cuda:0", "AMD Instinct MI300X", gfx_arch="gfx942")
STATIC = QuantConfig.make("fp8", scheme="per-tensor", params={"activation_scheme": "static"})


def _layer(method_cls, config, weight, scale, input_scale=None):
    spec = LayerSpec("blocks.0.ff", weight.shape[1], weight.shape[0], True, torch.bfloat16)
    layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.bfloat16)
    layer.weight.data = weight.clone()
    if config.online:
        layer.bias.data = torch.zeros(weight.shape[0], dtype=torch.bfloat16)
        layer.method.process_weights_after_loading(layer)
        return layer
    layer.weight_scale.data = scale.clone()
    if input_scale is not None:
        layer.input_scale.data = input_scale.clone()
    layer.bias.data = torch.zeros(weight.shape[0], dtype=torch.bfloat16)
    layer.method.process_weights_after_loading(layer)
    return layer


def _emulated_scaled_mm(method, layer, x2):
    """What torch._scaled_mm computes from the prepared arguments, in fp32 on the CPU."""
    q, scale_a = method.quantize_input(layer, x2)
    scale_b = layer.weight_scale if method.static else layer._scale_b
    return (q.float() * scale_a) @ (layer.weight.float() * scale_b.reshape(-1, 1).float()).T


def _fp8_weight(n=64, k=128):
    torch.manual_seed(0)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # e4m3fn NaN codes are not weights
    codes[0, 0] = 0x80  # -0, which fnuz reads as NaN
    return codes.view(torch.float8_e4m3fn)


def test_fnuz_bytes_and_doubled_scales_reproduce_the_dequantized_weight():
    weight, scale, input_scale = _fp8_weight(), torch.tensor(0.01), torch.tensor(0.02)
    layer = _layer(Fp8FnuzMethod, STATIC, weight, scale, input_scale)
    assert layer.weight.dtype == torch.float8_e4m3fnuz
    assert layer.weight_scale.item() == pytest.approx(0.02) and layer.input_scale.item() == pytest.approx(0.04)
    # exact: each fnuz code is half its fn value, each scale twice; -0 became +0, not fnuz's NaN
    assert torch.equal(layer.weight.float() * layer.weight_scale, weight.float() * scale)
    assert not torch.isnan(layer.weight.float()).any()


def test_static_activations_keep_their_calibrated_range():
    """input_scale doubles with the weight's: x up to 448 * input_scale maps onto fnuz's 224, and
    the emulated GEMM equals the e4m3fn reference exactly (fnuz's grid is fn's halved)."""
    weight, scale, input_scale = _fp8_weight(), torch.tensor(0.01), torch.tensor(0.02)
    adapter = _layer(Fp8FnuzMethod, STATIC, weight, scale, input_scale)
    reference = _layer(Fp8ReferenceMethod, STATIC, weight, scale, input_scale)
    # |x| / input_scale up to 440, under fn's 448 (above it fn saturates and fnuz, whose top is
    # 480 in fn's units, does not: the only place the two grids differ)
    x = (torch.randn(16, 128) * 3).clamp(-8.8, 8.8)
    got = _emulated_scaled_mm(adapter.method, adapter, x)
    expected = reference.method.apply(reference, x.float(), None)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-4)


def test_online_per_channel_dynamic_matches_the_reference_within_fp8():
    torch.manual_seed(1)
    weight = torch.randn(64, 128).bfloat16()
    config = online_config()
    adapter = _layer(Fp8FnuzMethod, config, weight, None)
    reference = _layer(Fp8ReferenceMethod, config, weight, None)
    assert adapter.weight.dtype == torch.float8_e4m3fnuz
    x = torch.randn(32, 128)
    got = _emulated_scaled_mm(adapter.method, adapter, x)
    expected = reference.method.apply(reference, x.float(), None)
    # Per-token activations round on fnuz's grid (amax / 240) instead of fn's (amax / 448): two
    # FP8 roundings of ~2^-4 relative each, which a 128-term dot product averages down.
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cos >= 0.999


def test_offered_for_the_fp8_family_only_where_it_runs():
    layer = LayerSpec("blocks.0.ff", 128, 64, True, torch.bfloat16)
    offer = create_linear_method(STATIC, layer, MI300)
    assert isinstance(offer, Fp8FnuzMethod) and offer.unavailable_reason is None and offer.kind == "native"
    cpu = create_linear_method(STATIC, layer, Platform("cpu", "cpu", "cpu"))
    assert "this device is cpu" in cpu.unavailable_reason
    assert "which the builtin fp8-scaled-mm serves" in fnuz_platform_reason(
        Platform("rocm", "cuda:0", "MI355X", gfx_arch="gfx950"))
    block = QuantConfig.make("fp8", scheme="block", params={"activation_scheme": "dynamic", "block": (128, 128)})
    assert "block scales" in fnuz_unavailable_reason(block, layer, MI300)


def _on_mi300() -> str | None:
    try:
        return fnuz_platform_reason(detect_platform())
    except Exception as exc:  # noqa: BLE001
        return str(exc)


@pytest.mark.rocm
@pytest.mark.skipif(_on_mi300() is not None, reason=f"needs an MI300 (gfx942) GPU: {_on_mi300()}")
def test_real_scaled_mm_on_mi300_matches_the_reference():
    weight, scale, input_scale = _fp8_weight(256, 512), torch.tensor(0.01), torch.tensor(0.02)
    adapter = _layer(Fp8FnuzMethod, STATIC, weight.cuda(), scale.cuda(), input_scale.cuda())
    reference = _layer(Fp8ReferenceMethod, STATIC, weight, scale, input_scale)
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    got = adapter(x.cuda()).float().cpu()
    expected = reference(x).float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.999


def test_on_mi300_the_plan_picks_it_over_the_builtin_scaled_mm(tmp_path):
    from diffgen.checkpoint import open_checkpoint
    from diffgen.plan import plan
    from diffgen.quant import QuantRequest
    from diffgen.tiny.transformers import save_tiny_transformer

    source = open_checkpoint(save_tiny_transformer("flux1", tmp_path / "t"))
    planned = plan(source, platform=MI300, dtype=torch.bfloat16, request=QuantRequest("fp8"))
    chosen = {(d.plugin, d.method.name) for d in planned.decisions if d.action == "quantize"}
    assert chosen == {("rocm", "rocm-fp8-fnuz")}
    on_cpu = plan(source, platform=Platform("cpu", "cpu", "cpu"), dtype=torch.float32, request=QuantRequest("fp8"))
    assert {d.method.name for d in on_cpu.decisions if d.action == "quantize"} == {"fp8-reference"}
