"""AMD Quark MXFP4 checkpoints: the fixtures amd-quark 0.13 wrote on the CPU (make_quark_fixtures.py),
decoded by the definition in the test, detected, loaded and run against the 16-bit model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffgen.checkpoint import open_checkpoint
from diffgen.errors import QuantConfigError
from diffgen.loader import load_transformer
from diffgen.plan import plan
from diffgen.platform import resolve
from diffgen.tiny.transformers import tiny_transformer, tiny_transformer_inputs
from diffgen_rocm.mxfp4 import quantize_mxfp4

import mx_definition as mx

FIXTURES = Path(__file__).parent / "fixtures"
PROVENANCE = json.loads((FIXTURES / "PROVENANCE.json").read_text())
EXPORTS = sorted(PROVENANCE["exports"])


def tensors_of(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / name / "diffusion_pytorch_model.safetensors")


def source_model(name: str) -> torch.nn.Module:
    spec = PROVENANCE["exports"][name]
    return tiny_transformer(spec["family"], seed=spec["seed"])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("name", EXPORTS)
def test_quark_bytes_decode_by_the_mx_definition_to_the_16bit_weights(name):
    tensors, reference = tensors_of(name), source_model(name).state_dict()
    layers = [n[: -len(".weight_quantizer.scale")] for n in tensors if n.endswith(".weight_quantizer.scale")]
    assert layers
    for prefix in layers:
        w = reference[f"{prefix}.weight"]
        packed, scales = tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_quantizer.scale"]
        assert packed.dtype == scales.dtype == torch.uint8
        assert packed.shape == (w.shape[0], w.shape[1] // 2) and scales.shape == (w.shape[0], w.shape[1] // 32)
        decoded = mx.decode_mxfp4(packed, scales)
        # Quark's export is exactly the even-rule quantization of the source weight ...
        assert torch.equal(decoded, mx.fake_quantize_mxfp4(w)), prefix
        # ... which lies within half the widest E2M1 step (4 -> 6) of it: |error| <= the group's
        # scale 2^e. A group max the even rule saturates (7 * 2^e -> 6 * 2^e) is off by 2^e too.
        groups = w.reshape(w.shape[0], -1, 32)
        bound = torch.pow(2.0, scales.double() - 127).float().unsqueeze(-1)
        assert ((decoded.reshape_as(groups) - groups).abs() <= bound).all(), prefix


@pytest.mark.parametrize("name", EXPORTS)
def test_online_quantization_writes_quarks_bytes(name):
    """diffgen's online MXFP4 and Quark's export agree to the byte (zero is +0 in both)."""
    tensors, reference = tensors_of(name), source_model(name).state_dict()
    for n, t in tensors.items():
        if n.endswith(".weight_quantizer.scale"):
            prefix = n[: -len(".weight_quantizer.scale")]
            packed, scales = quantize_mxfp4(reference[f"{prefix}.weight"], "even")
            assert torch.equal(scales, t) and torch.equal(packed, tensors[f"{prefix}.weight"]), prefix


def test_detection_reads_the_declaration_and_confirms_it_with_the_tensors():
    platform, dtype = resolve("cpu", "fp32")
    planned = plan(open_checkpoint(FIXTURES / "flux1-mxfp4"), platform=platform, dtype=dtype)
    claim = planned.claim
    assert claim.plugin == "rocm" and claim.specificity == 30
    assert claim.config.family == "mxfp4" and claim.config.scheme == "w4a4"
    assert claim.config.param("scale_rounding") == "even"
    assert "quant_method=quark" in claim.evidence and "20 packed FP4 weights" in claim.evidence
    exclude = json.loads((FIXTURES / "flux1-mxfp4" / "config.json").read_text())["quantization_config"]["exclude"]
    assert sorted(planned.kept()) == sorted(exclude)
    assert len(planned.quantized()) == 20
    assert all(d.method.name == "mxfp4-reference" for d in planned.decisions if d.action == "quantize")
    weight_only = plan(open_checkpoint(FIXTURES / "flux1-mxfp4-w4a16"), platform=platform, dtype=dtype)
    assert weight_only.claim.config.scheme == "w4a16"


def _independent_forward(name: str, inputs: dict) -> torch.Tensor:
    """The 16-bit model with every Quark linear replaced by the definition: decoded weight,
    activations rounded to MXFP4 per call (when the export quantizes them)."""
    model, tensors = source_model(name), tensors_of(name)
    activations = PROVENANCE["exports"][name]["activations"] is not None
    for n, t in tensors.items():
        if n.endswith(".weight_quantizer.scale"):
            linear = model.get_submodule(n[: -len(".weight_quantizer.scale")])
            weight = mx.decode_mxfp4(tensors[n.replace("weight_quantizer.scale", "weight")], t)

            def forward(x, linear=linear, weight=weight):
                x = mx.fake_quantize_mxfp4(x) if activations else x
                return torch.nn.functional.linear(x, weight, linear.bias)

            linear.forward = forward
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", EXPORTS)
def test_loaded_checkpoint_computes_the_definition(name):
    family = PROVENANCE["exports"][name]["family"]
    model = load_transformer(FIXTURES / name, device="cpu", dtype="fp32")
    base = source_model(name)
    inputs = tiny_transformer_inputs(family, base, seed=7)
    with torch.no_grad():
        got = model(**inputs, return_dict=False)[0]
        sixteen_bit = base(**inputs, return_dict=False)[0]
    # Same math in fp32 in a different order (the test's decode and rounding): agreement to
    # float rounding, far tighter than MXFP4's own error (next assertion).
    assert cosine(got, _independent_forward(name, inputs)) >= 0.99999
    # MXFP4 weights and activations (4-bit, 32-element groups) stay close to the 16-bit model:
    # measured 0.9996-0.9999 on these tiny random models.
    assert cosine(got, sixteen_bit) >= 0.995


def _variant(tmp_path, edit) -> Path:
    target = tmp_path / "variant"
    shutil.copytree(FIXTURES / "flux1-mxfp4", target)
    config = json.loads((target / "config.json").read_text())
    edit(config["quantization_config"])
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("edit, words", [
    (lambda qc: qc["global_quant_config"]["weight"].update(group_size=16), "weight.group_size=16"),
    (lambda qc: qc["global_quant_config"]["input_tensors"].update(dtype="fp8_e4m3", qscheme="per_tensor"),
     "input_tensors.dtype='fp8_e4m3'"),
    (lambda qc: qc["export"].update(weight_format="fake_quantized"), "weight_format='real_quantized'"),
    (lambda qc: qc["global_quant_config"]["input_tensors"].update(is_dynamic=False), "static MX activation"),
    (lambda qc: qc["global_quant_config"]["weight"].update(scale_calculation_mode="ceil"), "scale_calculation_mode"),
])
def test_other_quark_schemes_stop_with_what_is_not_mxfp4(tmp_path, edit, words):
    with pytest.raises(QuantConfigError, match="recognises this format") as err:
        load_transformer(_variant(tmp_path, edit), device="cpu", dtype="fp32")
    assert words in str(err.value) and "diffgen-rocm loads Quark MXFP4" in str(err.value)


def test_scales_that_do_not_cover_32_elements_are_refused(tmp_path):
    target = _variant(tmp_path, lambda qc: None)
    path = target / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    name = "transformer_blocks.0.attn.to_q.weight_quantizer.scale"
    tensors[name] = tensors[name].repeat(1, 2)  # one scale per 16 elements
    save_file(tensors, path)
    with pytest.raises(QuantConfigError, match="do not have MXFP4's scales, e.g. transformer_blocks.0.attn.to_q"):
        load_transformer(target, device="cpu", dtype="fp32")


def test_a_nan_scale_is_refused_naming_the_tensor(tmp_path):
    target = _variant(tmp_path, lambda qc: None)
    path = target / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["transformer_blocks.0.attn.to_k.weight_quantizer.scale"][3, 0] = 0xFF
    save_file(tensors, path)
    with pytest.raises(Exception, match=r"transformer_blocks.0.attn.to_k.weight_scale holds 0xFF.*NaN in E8M0"):
        load_transformer(target, device="cpu", dtype="fp32")


def test_quantization_flag_on_a_quark_checkpoint_is_refused():
    with pytest.raises(QuantConfigError, match="already quantized"):
        load_transformer(FIXTURES / "flux1-mxfp4", device="cpu", dtype="fp32", quantization="mxfp4")


@pytest.mark.parametrize("name", ["flux1-mxfp4", "wan-mxfp4-transformer"])
def test_the_conformance_writer_reproduces_quarks_export(name, tmp_path):
    """diffgen_rocm.quark_fixture (the format definition, published for conformance runs) writes
    the same tensors and exclude list as amd-quark itself for the same model."""
    from diffgen.tiny.transformers import save_tiny_transformer
    from diffgen_rocm.quark_fixture import write_quark_mxfp4

    spec = PROVENANCE["exports"][name]
    src = save_tiny_transformer(spec["family"], tmp_path / "src", seed=spec["seed"], dtype=torch.float32)
    write_quark_mxfp4(src, tmp_path / "dst")
    ours, theirs = load_file(tmp_path / "dst" / "diffusion_pytorch_model.safetensors"), tensors_of(name)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    config = lambda d: json.loads((d / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert sorted(config(tmp_path / "dst")["exclude"]) == sorted(config(FIXTURES / name)["exclude"])
