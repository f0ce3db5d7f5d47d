"""Detection from quant_model_description*.json: every scheme, the layers kept 16-bit, and every
contradiction between the description and the tensors as an error naming the file and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.errors import LoadError, QuantConfigError

SCHEMES = ["W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC", "W8A8_MXFP8", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE"]
LAYER = "transformer_blocks.0.attn.to_k"  # not smoothed: its tensors keep plain names


@pytest.fixture
def checkpoints(flux_checkpoints):
    return flux_checkpoints


def load(path, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=torch.float32, **kwargs)


def plan_of(path):
    from diffgen.checkpoint import open_checkpoint
    from diffgen.plan import plan
    from diffgen.platform import resolve

    platform, dtype = resolve("cpu", torch.float32)
    return plan(open_checkpoint(path), platform=platform, dtype=dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_claimed_per_layer_and_float_layers_stay_16bit(scheme, checkpoints):
    path, layers = checkpoints[scheme]
    planned = plan_of(path)
    claim = planned.claim
    assert claim.plugin == "ascend" and claim.specificity == 30
    assert f"quant_model_description_{scheme.lower()}.json" in claim.evidence
    assert planned.config.family == "msmodelslim" and planned.config.scheme == scheme
    assert set(planned.quantized()) == set(layers)
    kept = {d.layer.name: d.reason for d in planned.decisions if d.action == "keep"}
    assert kept["x_embedder"] == "excluded by the checkpoint ('x_embedder')"
    assert "proj_out" in kept and "time_text_embed.timestep_embedder.linear_1" in kept


def copy(checkpoints, scheme, tmp_path):
    path = tmp_path / scheme
    shutil.copytree(checkpoints[scheme][0], path)
    weights = next(path.glob("quant_model_weight*.safetensors"))
    desc = next(path.glob("quant_model_description*.json"))
    return path, weights, desc


def edit(weights, desc, tensors=None, description=None):
    t = load_file(weights)
    d = json.loads(desc.read_text())
    if tensors:
        tensors(t)
    if description:
        description(d)
    save_file(t, str(weights))
    desc.write_text(json.dumps(d))


CONTRADICTIONS = {
    "wrong dtype": ("W8A8_DYNAMIC", lambda t: t.__setitem__(f"{LAYER}.weight", t[f"{LAYER}.weight"].half()), None,
                    rf"tensor {LAYER}.weight is float16, but .* says {LAYER} is W8A8_DYNAMIC"),
    "missing tensor": ("W8A8", lambda t: t.pop(f"{LAYER}.quant_bias"), lambda d: d.pop(f"{LAYER}.quant_bias"),
                       rf"needs tensor {LAYER}.quant_bias; the weights do not have it"),
    "unsupported type": ("W8A8_DYNAMIC", None, lambda d: d.__setitem__(f"{LAYER}.weight", "W8A16"),
                         r"msmodelslim types diffgen does not load: W8A16 .*supported: W8A8, W8A8_DYNAMIC"),
    "unknown type": ("W8A8_DYNAMIC", None, lambda d: d.__setitem__(f"{LAYER}.weight", "W3A3"),
                     r"types msmodelslim does not write: W3A3"),
    "per-group": ("W8A8_DYNAMIC", lambda t: t.__setitem__(f"{LAYER}.weight_scale", torch.ones(32, 2)), None,
                  rf"tensor {LAYER}.weight_scale is \[32, 2\]: per-group W8A8_DYNAMIC \(group size 16\) is not supported"),
    "undeclared": ("W8A8_DYNAMIC", lambda t: t.__setitem__("stray.weight", torch.zeros(4, 4, dtype=torch.int8)), None,
                   r"tensor stray.weight is int8 but quant_model_description_w8a8_dynamic.json .* does not list it"),
    "float but int8": ("W8A8_DYNAMIC", lambda t: t.__setitem__("proj_out.weight", t["proj_out.weight"].to(torch.int8)),
                       None, r"says proj_out.weight is FLOAT, but the tensor is int8"),
    "scale shape": ("W4A4_MXFP4", lambda t: t.__setitem__(f"{LAYER}.weight_scale", torch.zeros(32, 2, dtype=torch.uint8)),
                    None, rf"tensor {LAYER}.weight_scale is \[32, 2\]; W4A4_MXFP4 with weight \[32, 16\] needs \[32, 1\]"),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_contradictions_are_errors_naming_file_and_tensor(case, checkpoints, tmp_path):
    scheme, tensors, description, message = CONTRADICTIONS[case]
    path, weights, desc = copy(checkpoints, scheme, tmp_path)
    edit(weights, desc, tensors, description)
    with pytest.raises(QuantConfigError, match=message) as err:
        load(path)
    assert "plugin ascend recognises this format but cannot load it" in str(err.value)


def test_the_plain_description_name_wins_over_suffixed_ones(checkpoints, tmp_path):
    path, weights, desc = copy(checkpoints, "W8A8_DYNAMIC", tmp_path)
    d = json.loads(desc.read_text())
    (path / "quant_model_description.json").write_text(json.dumps(d))
    d[f"{LAYER}.weight"] = "W3A3"  # the suffixed file is now wrong; it must not be read
    desc.write_text(json.dumps(d))
    assert "quant_model_description.json" in plan_of(path).claim.evidence


def test_int64_deq_scale_holds_the_fp32_bits(checkpoints, tmp_path):
    path, weights, desc = copy(checkpoints, "W8A8", tmp_path)
    reference = load(checkpoints["W8A8"][0])
    edit(weights, desc, lambda t: t.update({k: t[k].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
                                            for k in list(t) if k.endswith(".deq_scale")}))
    model = load(path)
    assert model.get_submodule(LAYER).deq_scale.dtype == torch.float32
    assert torch.equal(model.get_submodule(LAYER).deq_scale, reference.get_submodule(LAYER).deq_scale)
    edit(weights, desc, lambda t: t.__setitem__(f"{LAYER}.deq_scale", t[f"{LAYER}.deq_scale"] | (1 << 46)))
    with pytest.raises(LoadError, match=rf"tensor {LAYER}.deq_scale is int64 with bits set above bit 31"):
        load(path)


def test_int4_values_out_of_range_are_refused(checkpoints, tmp_path):
    path, weights, desc = copy(checkpoints, "W4A4_DYNAMIC", tmp_path)
    edit(weights, desc, lambda t: t[f"{LAYER}.weight"].__setitem__((0, 0), 100))
    with pytest.raises(LoadError, match=rf"tensor {LAYER}.weight is W4A4_DYNAMIC but holds values in \[-?\d+, 100\]"):
        load(path)


def test_fp8_container_mxfp4_weights_are_packed_on_load(checkpoints, tmp_path):
    """msmodelslim before 2026-04 stored each E2M1 value in a float8_e4m3fn byte."""
    from msmodelslim_writer import e2m1_value

    path, weights, desc = copy(checkpoints, "W4A4_MXFP4", tmp_path)
    reference = load(checkpoints["W4A4_MXFP4"][0])

    def unpack(t):
        for k in [k for k in t if k.endswith(".weight") and t[k].dtype == torch.uint8]:
            codes = torch.stack((t[k] & 15, t[k] >> 4), -1).reshape(t[k].shape[0], -1)
            t[k] = e2m1_value(codes).to(torch.float8_e4m3fn)

    edit(weights, desc, unpack)
    model = load(path)
    assert torch.equal(model.get_submodule(LAYER).weight, reference.get_submodule(LAYER).weight)
    edit(weights, desc, lambda t: t[f"{LAYER}.weight"].__setitem__((0, 0), 0.25))
    with pytest.raises(LoadError, match="holds values that are not E2M1 values"):
        load(path)


def test_a_quantization_flag_on_an_msmodelslim_checkpoint_is_an_error(checkpoints):
    with pytest.raises(QuantConfigError, match="already quantized"):
        load(checkpoints["W8A8_MXFP8"][0], quantization="mxfp8")
