"""Every scheme's methods against the definition written in msmodelslim_writer (Emulated), and the
NVIDIA methods' argument preparation on the CPU (torch._int_mm runs on the CPU too)."""

from __future__ import annotations

import pytest
import torch

import diffgen
from diffgen.numerics.e2m1 import e2m1_to_float, unpack_e2m1
from diffgen.numerics.e8m0 import e8m0_to_float
from diffgen.platform import Platform
from diffgen.quant import LayerSpec, QuantConfig
from diffgen.tiny.transformers import tiny_transformer, tiny_transformer_inputs
from diffgen_ascend import methods, schemes
from diffgen_ascend.plugin import create_linear_method
from ascend_layers import cosine, layer_from, random_layer, run
from msmodelslim_writer import Emulated, emulate

SCHEMES = list(schemes.SCHEMES)
H100 = Platform("cuda", "cuda:0", "NVIDIA H100", (9, 0))
CPU = Platform("cpu", "cpu", "x86_64")


@pytest.fixture
def written(flux_checkpoints):
    return flux_checkpoints


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reference_computes_the_definition(scheme, written):
    """Whole transformer: the loaded checkpoint against the writer's own emulation of the same
    tensors. Same operations; only the summation order and fp32 (here) against fp64 (there) of
    the per-layer products differ, ~1e-7 relative per layer: 1e-6 on the cosine would already
    flag one wrong scale or rounding rule (measured deviations are below 1e-12)."""
    path, layers = written[scheme]
    model = diffgen.load_transformer(path, device="cpu", dtype=torch.float32)
    assert {d.method.name for d in model.diffgen_plan.decisions if d.method} == {"msmodelslim-reference"}
    reference = emulate(tiny_transformer("flux1", seed=0), layers)
    sixteen = tiny_transformer("flux1", seed=0)
    for seed in (1, 2):
        inputs = tiny_transformer_inputs("flux1", sixteen, seed=seed)
        out = run(model, inputs)
        assert cosine(out, run(reference, inputs)) >= 1 - 1e-6
        # And it is still the model: 4-bit weights and activations keep ~0.9995 on this tiny FLUX.1.
        assert cosine(out, run(sixteen, inputs)) >= 0.995


@pytest.mark.parametrize("scheme", ["W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC"])
def test_int_mm_method_matches_the_definition(scheme):
    """The integer GEMM is exact; the result differs from fp64 only by the fp32 rescale (1e-6)."""
    t = random_layer(scheme)
    if scheme == "W4A4_DYNAMIC":
        t["weight_offset"] = torch.randint(-1, 2, (48, 1), generator=torch.Generator().manual_seed(5)).float()
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1)) * 2
    x[0, 0] = 0  # a zero token: scale 0, output = bias
    int_mm = layer_from(scheme, t, methods.MsmodelslimIntMMMethod)
    reference = layer_from(scheme, t, methods.MsmodelslimReferenceMethod)
    y = int_mm(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-6, atol=1e-5)
    # The definition (Emulated has no weight_offset: the offset is folded into the int weight by hand).
    folded = dict(t)
    if "weight_offset" in t:
        folded["weight"] = (t["weight"].float() - t["weight_offset"]).to(torch.int8)
    torch.testing.assert_close(y, Emulated(scheme, folded, 64)(x), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scheme", ["W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE"])
def test_packed4_arguments_decode_to_the_reference_weight(scheme):
    """What the CUDA method hands diffgen-cuda's kernels, decoded with core numerics (E2M1 codes
    times the per-32 scale), is the reference weight bit for bit."""
    t = random_layer(scheme, k=1024 + 64)
    layer = layer_from(scheme, t, methods.MsmodelslimReferenceMethod)
    weight, scale, global_scale, kind = methods.packed4_arguments(scheme, layer)
    assert weight.dtype == torch.uint8 and weight.shape == (48, 544) and scale.shape == (48, 34)
    packed4 = pytest.importorskip("diffgen_cuda.packed4", reason="the scale kinds are diffgen-cuda's")
    assert kind == (packed4.E8M0 if scheme == "W4A4_MXFP4" else packed4.FLOAT)
    per_32 = e8m0_to_float(scale) if kind == packed4.E8M0 else scale
    decoded = (e2m1_to_float(unpack_e2m1(weight)).reshape(48, -1, 32) * per_32[..., None]).reshape(48, -1)
    assert torch.equal(decoded * global_scale, Emulated(scheme, t, 1088).weight())


def test_mxfp8_dequant_method_matches_the_reference():
    t = random_layer("W8A8_MXFP8", k=96)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    y = layer_from("W8A8_MXFP8", t, methods.MsmodelslimMxfp8DequantMethod)(x)
    torch.testing.assert_close(y, Emulated("W8A8_MXFP8", t, 96)(x), rtol=1e-5, atol=1e-5)


def test_the_description_can_choose_the_mxfp4_activation_scale_rule(flux_checkpoints, tmp_path):
    """SGLang reads mxfp4_scale_alg from the description; 0 is the OCP floor rule."""
    import json
    import shutil

    from msmodelslim_writer import mx_fake

    path = tmp_path / "alg0"
    shutil.copytree(flux_checkpoints["W4A4_MXFP4"][0], path)
    desc = next(path.glob("quant_model_description*.json"))
    desc.write_text(json.dumps({**json.loads(desc.read_text()), "mxfp4_scale_alg": 0}))
    layer = diffgen.load_transformer(path, device="cpu", dtype=torch.float32).get_submodule("transformer_blocks.0.ff.net.2")
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(6)) * 3
    w = Emulated("W4A4_MXFP4", {k: getattr(layer, k).data for k in ("weight", "weight_scale")}, layer.in_features).weight()
    expected = mx_fake(x, "e2m1", "floor", "away") @ w.T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_smoothing_multiplies_the_input_first():
    t = random_layer("W8A8_DYNAMIC")
    t["mul_scale"] = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    for cls in (methods.MsmodelslimReferenceMethod, methods.MsmodelslimIntMMMethod):
        y = layer_from("W8A8_DYNAMIC", t, cls, smooth=True)(x)
        torch.testing.assert_close(y, Emulated("W8A8_DYNAMIC", t, 64)(x), rtol=1e-6, atol=1e-5)


def test_offers_and_their_reasons():
    config = QuantConfig.make("msmodelslim", scheme="W8A8", layer_schemes={"a": "W8A8", "b": "W4A4_MXFP4"})
    spec = LayerSpec("a", 64, 64, True, torch.bfloat16)
    on_gpu = {m.name: m.unavailable_reason for m in create_linear_method(config, spec, H100)}
    assert on_gpu["msmodelslim-int-mm"] is None and on_gpu["msmodelslim-reference"] is None
    assert on_gpu["msmodelslim-npu"] == "torch_npu kernels run on an Ascend NPU; this device is cuda"
    on_cpu = {m.name: m.unavailable_reason for m in create_linear_method(config, spec, CPU)}
    assert on_cpu["msmodelslim-int-mm"] == "torch._int_mm runs on NVIDIA GPUs here; this device is cpu"
    mx = {m.name: m.unavailable_reason for m in create_linear_method(config, LayerSpec("b", 64, 64, True, torch.float32), H100)}
    assert mx["msmodelslim-packed4"] == "msmodelslim-packed4 computes in bf16 or fp16, not torch.float32"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_nvidia_methods_match_the_reference_on_the_gpu(scheme, written):
    """On an H100/H200: the exact NVIDIA method of each scheme (int-mm, packed4, mxfp8-dequant)
    against the reference method, bf16. Same function (exact integers; MX activations quantized by
    the same rule), so only bf16 rounding of the outputs and GEMM order differ: cosine >= 0.999.
    The integer schemes' default on SM89+ is msmodelslim-fp8 (E4M3 weights and activations): held
    to the gate of FP8 linears, 0.99."""
    path, _ = written[scheme]
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    exact_method = {"W8A8_MXFP8": "msmodelslim-mxfp8-dequant", "W4A4_MXFP4": "msmodelslim-packed4",
                    "W4A4_MXFP4_DUALSCALE": "msmodelslim-packed4"}.get(scheme, "msmodelslim-int-mm")
    default = "msmodelslim-fp8" if fp8 and exact_method == "msmodelslim-int-mm" else exact_method
    native = diffgen.load_transformer(path, device="cuda", dtype=torch.bfloat16)
    assert {d.method.name for d in native.diffgen_plan.decisions if d.method} == {default}
    exact = diffgen.load_transformer(path, device="cuda", dtype=torch.bfloat16, quant_backend=exact_method)
    reference = diffgen.load_transformer(path, device="cuda", dtype=torch.bfloat16, quant_backend="msmodelslim-reference")
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
              for k, v in tiny_transformer_inputs("flux1", tiny_transformer("flux1", dtype=torch.bfloat16), seed=1).items()}
    expected = run(reference, inputs)
    assert cosine(run(exact, inputs), expected) >= 0.999
    if default != exact_method:
        assert cosine(run(native, inputs), expected) >= 0.99
