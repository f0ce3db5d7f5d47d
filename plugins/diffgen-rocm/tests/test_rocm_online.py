"""Online ``--quantization mxfp4``: the claim, the 256-output rule, quantization as weights stream
in, and the NVIDIA packed4 method's arguments decoded on the CPU against the reference."""

from __future__ import annotations

import pytest
import torch

from diffgen.checkpoint import open_checkpoint
from diffgen.linear import QuantLinear
from diffgen.loader import load_transformer
from diffgen.plan import plan
from diffgen.platform import Platform, resolve
from diffgen.quant import LayerSpec, QuantRequest
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer_inputs
from diffgen_rocm import mxfp4
from diffgen_rocm.mxfp4_cuda import NEEDS_DIFFGEN_CUDA, Mxfp4Packed4Method, packed4_unavailable_reason

import mx_definition as mx
from wide_models import wide_transformer


def _save(model, path):
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_layers_with_fewer_than_256_outputs_stay_16bit(tmp_path):
    model = wide_transformer("flux1", heads=1)  # hidden 128: attention N=128, MLP and modulation N>=384
    platform, dtype = resolve("cpu", "fp32")
    planned = plan(open_checkpoint(_save(model, tmp_path / "t")), platform=platform, dtype=dtype,
                   request=QuantRequest("mxfp4"))
    assert planned.claim.plugin == "rocm" and planned.claim.config.online
    assert "kept 16-bit, as SGLang-Diffusion does" in planned.claim.evidence
    sizes = {n: m.out_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = set(planned.quantized())
    assert quantized and all(sizes[n] >= 256 for n in quantized)
    assert "transformer_blocks.0.ff.net.0.proj" in quantized
    assert "transformer_blocks.0.attn.to_q" in planned.kept()  # N = 128
    reasons = {d.layer.name: d.reason for d in planned.decisions}
    assert reasons["x_embedder"].startswith("precision-sensitive")  # the default ignore says why first
    everything = plan(open_checkpoint(tmp_path / "t"), platform=platform, dtype=dtype,
                      request=QuantRequest("mxfp4", quantize_all_layers=True))
    # --quantize-all-layers lifts the default ignores, not the 256-output floor: x_embedder (N=128)
    # stays 16-bit, the guidance embedder's N=128 layers too; nothing wide is left out
    assert "x_embedder" in everything.kept() and set(everything.quantized()) >= quantized
    assert all(sizes[n] >= 256 for n in everything.quantized())


def test_tiny_pipeline_transformer_keeps_everything_16bit(tmp_path):
    path = save_tiny_transformer("flux1", tmp_path / "t")
    platform, dtype = resolve("cpu", "fp32")
    planned = plan(open_checkpoint(path), platform=platform, dtype=dtype, request=QuantRequest("mxfp4"))
    assert planned.quantized() == []  # every tiny FLUX.1 linear has fewer than 256 outputs


def test_weights_are_quantized_while_they_load_and_match_the_definition(tmp_path):
    model = wide_transformer("wan", heads=2)
    loaded = load_transformer(_save(model, tmp_path / "t"), device="cpu", dtype="fp32", quantization="mxfp4")
    reference = model.state_dict()
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert layers
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.uint8
        expected = mx.fake_quantize_mxfp4(reference[f"{name}.weight"])
        assert torch.equal(mx.decode_mxfp4(layer.weight, layer.weight_scale, layer.in_features), expected), name
    inputs = tiny_transformer_inputs("wan", model, seed=3)
    with torch.no_grad():
        got, sixteen_bit = loaded(**inputs, return_dict=False)[0], model(**inputs, return_dict=False)[0]
    cos = torch.nn.functional.cosine_similarity(got.flatten(), sixteen_bit.flatten(), dim=0).item()
    assert cos >= 0.995  # W4A4 MXFP4 on a random model: measured about 0.999


def test_unknown_scheme_is_refused():
    request = QuantRequest("mxfp4", scheme="w4a8")

    class Source:
        tensors, config = {}, {}

    claim = mxfp4.online_claim(Source(), request)
    assert claim.unsupported_reason == "mxfp4 schemes are w4a4, w4a16, not 'w4a8'"


def _online_layer(method_cls, weight: torch.Tensor, bias: torch.Tensor | None):
    config = mxfp4.online_claim(type("S", (), {"tensors": {}, "config": {}})(), QuantRequest("mxfp4")).config
    spec = LayerSpec("blocks.0.ff", weight.shape[1], weight.shape[0], bias is not None, torch.float32)
    layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.float32)
    layer.weight.data = weight.clone()
    if bias is not None:
        layer.bias.data = bias.clone()
    layer.method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("k", [256, 80])  # 80: K padded to 96, as packed4 expects Kp
def test_packed4_arguments_decode_to_the_reference_weight(k):
    torch.manual_seed(0)
    weight, bias = torch.randn(320, k) * 0.05, torch.randn(320)
    method_layer = _online_layer(Mxfp4Packed4Method, weight, bias)
    args = method_layer.method.packed4_arguments(method_layer)
    kp = mxfp4.padded_k(k)
    # packed4's layout: uint8 [N, Kp/2] low nibble first, uint8 E8M0 [N, Kp/32] contiguous, fp32 () ones
    assert args["weight"].dtype == torch.uint8 and tuple(args["weight"].shape) == (320, kp // 2)
    assert args["scale"].dtype == torch.uint8 and tuple(args["scale"].shape) == (320, kp // 32)
    assert args["scale"].is_contiguous() and args["group"] == 32 and args["in_features"] == k
    assert args["global_scale"].dtype == torch.float32 and args["global_scale"].shape == () and args["global_scale"] == 1
    decoded = mx.decode_mxfp4(args["weight"], args["scale"], k) * args["global_scale"]
    reference = _online_layer(mxfp4.Mxfp4ReferenceMethod, weight, bias)
    assert torch.equal(decoded, reference.method.dequantized_weight(reference, torch.float32))
    padded = torch.nn.functional.pad(weight, (0, kp - k))
    assert torch.equal(decoded, mx.fake_quantize_mxfp4(padded)[:, :k])


def test_packed4_offer_says_why_it_cannot_run_here(monkeypatch):
    layer = LayerSpec("x", 256, 256, False, torch.bfloat16)
    cpu = Platform("cpu", "cpu", "cpu")
    reason = packed4_unavailable_reason(layer, cpu)
    assert reason and "cpu" in reason
    monkeypatch.setitem(__import__("sys").modules, "diffgen_cuda", None)  # not installed
    assert packed4_unavailable_reason(layer, cpu) == NEEDS_DIFFGEN_CUDA
