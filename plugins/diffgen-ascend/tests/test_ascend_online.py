"""--quantization mxfp8 and mxfp4_npu on a 16-bit checkpoint: claimed by this plugin (never mxfp4,
the ROCm plugin's), weights quantized as the NPU ops quantize them (fake_torch_npu, from the op
docs), the emulation warned about once, and the model still the 16-bit model."""

from __future__ import annotations

import logging

import pytest
import torch

import diffgen
import fake_torch_npu
from diffgen.errors import QuantConfigError
from diffgen.linear import QuantLinear
from diffgen.tiny.transformers import tiny_transformer, tiny_transformer_inputs
from ascend_layers import cosine, run


def load(path, method, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=torch.float32, quantization=method, **kwargs)


@pytest.mark.parametrize("method,scheme", [("mxfp8", "W8A8_MXFP8"), ("mxfp4_npu", "W4A4_MXFP4_DUALSCALE")])
def test_online_weights_are_what_the_npu_op_makes(method, scheme, flux_16bit, caplog, monkeypatch):
    from diffgen_ascend import methods

    monkeypatch.setattr(methods, "_WARNED", set())  # said once per process; this test wants to see it
    with caplog.at_level(logging.WARNING, logger="diffgen"):
        model = load(flux_16bit, method)
    claim = model.diffgen_plan.claim
    assert (claim.plugin, claim.specificity, claim.config.scheme, claim.config.online) == ("ascend", 100, scheme, True)
    warnings = [r.getMessage() for r in caplog.records if "no Ascend NPU here" in r.getMessage()]
    assert len(warnings) == 1 and f"--quantization {method} (online)" in warnings[0]
    sixteen = tiny_transformer("flux1", seed=0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "x_embedder" not in layers and "transformer_blocks.0.attn.to_q" in layers  # embedders stay 16-bit
    for name, layer in layers.items():
        w = sixteen.get_submodule(name).weight.detach()
        if method == "mxfp8":
            q, s = fake_torch_npu.npu_dynamic_mx_quant(w, dst_type=torch.float8_e4m3fn)
            assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(layer.weight_scale, s.reshape(s.shape[0], -1)[:, : layer.weight_scale.shape[1]]), name
        else:
            q, l0, l1 = fake_torch_npu.npu_dynamic_dual_level_mx_quant(w)
            assert torch.equal(layer.weight, q) and torch.equal(layer.weight_dual_scale[..., 0], l0), name
            assert torch.equal(layer.weight_scale, l1.reshape(l1.shape[0], -1)[:, : layer.weight_scale.shape[1]]), name
    # MXFP8 keeps ~3 significant bits, dual-level FP4 ~1.5, on weights and activations: the tiny
    # FLUX.1 measures 0.9999 and 0.9995; 0.995 fails a wrong scale or layout by far.
    inputs = tiny_transformer_inputs("flux1", sixteen, seed=1)
    assert cosine(run(model, inputs), run(sixteen, inputs)) >= 0.995


def test_mxfp4_is_not_ours(flux_16bit):
    with pytest.raises(QuantConfigError, match="no installed plugin implements online quantization 'mxfp4'"):
        load(flux_16bit, "mxfp4")


def test_ignored_layers_are_honoured(flux_16bit):
    model = load(flux_16bit, "mxfp8", quantization_ignored_layers=["attn.to_"])
    kept = {d.layer.name for d in model.diffgen_plan.decisions if d.action == "keep"}
    assert "transformer_blocks.0.attn.to_q" in kept and "transformer_blocks.0.ff.net.2" not in kept
