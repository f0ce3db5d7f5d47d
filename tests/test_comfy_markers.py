"""ComfyUI's per-layer quantization markers (``<layer>.comfy_quant`` JSON tensors, the
``_quantization_metadata`` header) on BFL-named FLUX files: read, checked against the tensors,
left out of the model, and the tiled NVFP4 scales the shape betrays put back in rows.

Fixtures are written here from ComfyUI's format: FP8 layers as float8_e4m3fn weights with a scalar
fp32 ``weight_scale`` (a dequant multiplier) and a ``{"format": "float8_e4m3fn"}`` marker."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import diffgen
from diffgen.builtin import comfy
from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear
from diffgen.quant import RepackTarget
from diffgen.tiny.transformers import tiny_transformer
from tests.test_bfl_layout import BLOCK_LINEAR, bfl_state_dict, diffusers_conversion

PREFIX = "model.diffusion_model."


def marker(conf) -> torch.Tensor:
    text = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
    return torch.tensor(list(text.encode() if isinstance(text, str) else text), dtype=torch.uint8)


def comfy_fp8_file(family: str, *, markers: str = "tensor", seed: int = 4):
    """(file tensors, metadata, the BFL state dict the file stands for): every BLOCK_LINEAR as ComfyUI's
    float8_e4m3fn layer, marked by comfy_quant tensors ("tensor") or the header ("metadata")."""
    file, logical, layers = {}, {}, {}
    for name, t in bfl_state_dict(family, seed=seed).items():
        module = name.rpartition(".")[0]
        if module in BLOCK_LINEAR and name.endswith(".weight"):
            scale = (t.abs().amax() / 448).float()
            file[name] = (t / scale).to(torch.float8_e4m3fn)
            file[f"{module}.weight_scale"] = scale
            logical[name] = file[name].float() * scale
            layers[module] = {"format": "float8_e4m3fn"}
            if markers == "tensor":
                file[f"{module}.comfy_quant"] = marker(layers[module])
        else:
            file[name] = logical[name] = t
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} \
        if markers == "metadata" else None
    return {PREFIX + k: v for k, v in file.items()}, metadata, logical


def write(tmp_path, family, file, metadata=None):
    weights = tmp_path / f"{family}-comfy.safetensors"
    save_file(file, str(weights), metadata=metadata)
    config_dir = tmp_path / "transformer"
    tiny_transformer(family).save_config(config_dir)
    return config_dir, weights


def load(config_dir, weights):
    return diffgen.load_transformer(config_dir, weights_path=weights, device="cpu", dtype="float32")


@pytest.mark.parametrize("family, markers", [("flux1", "tensor"), ("flux2", "tensor"), ("flux2", "metadata")])
def test_comfy_fp8_layers_load_as_their_definition_and_the_markers_are_no_tensor(tmp_path, monkeypatch, family,
                                                                                markers):
    file, metadata, logical = comfy_fp8_file(family, markers=markers)
    config_dir, weights = write(tmp_path, family, file, metadata)
    model = load(config_dir, weights)  # a marker left in the stream would be an "unexpected" tensor
    assert model.diffgen_plan.config.family == "fp8"
    expected = diffusers_conversion(family, logical, monkeypatch)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == (15 if family == "flux1" else 12)
    for name, layer in layers.items():
        # e4m3 value x its fp32 scale, as the oracle multiplied them: exact
        assert torch.equal(layer.weight.float() * layer.weight_scale, expected[f"{name}.weight"]), name


def _one_layer_file(tmp_path, **changes):
    """A ComfyUI FP8 FLUX.1 file with ``changes`` applied (name -> tensor, or None to remove)."""
    file, _, _ = comfy_fp8_file("flux1")
    for name, tensor in changes.items():
        if tensor is None:
            file.pop(PREFIX + name)
        else:
            file[PREFIX + name] = tensor
    return write(tmp_path, "flux1", file)


QKV = "double_blocks.0.img_attn.qkv"


@pytest.mark.parametrize("payload, says", [
    (b"{\"format\": ", r"is not valid UTF-8 JSON"),
    (b"\xff\xfe", r"is not valid UTF-8 JSON"),
    ("[1, 2]", r"holds list JSON, not an object"),
    ({"group_size": 16}, r"has no \"format\" string"),
    ({"format": "float8_e4m3fnuz"}, r"names 'float8_e4m3fnuz', an unknown format"),
    ({"format": "mxfp8"}, r"names 'mxfp8', a ComfyUI format diffgen does not load"),
    ({"format": "nvfp4"}, r"says nvfp4 but .*qkv.weight is float8_e4m3fn"),
], ids=["truncated", "not-utf8", "a-list", "no-format", "unknown", "not-loaded", "contradicts-weight"])
def test_a_bad_marker_stops_the_load_naming_file_and_tensor(tmp_path, payload, says):
    config_dir, weights = _one_layer_file(tmp_path, **{f"{QKV}.comfy_quant": marker(payload)})
    with pytest.raises(DiffgenError, match=rf"(?s)file {re.escape(str(weights))}, tensor '{PREFIX}{QKV}.comfy_quant'.*"
                                           rf"{says}"):
        load(config_dir, weights)


def test_a_marker_on_a_16bit_weight_and_a_marker_of_the_wrong_dtype_are_named(tmp_path):
    file, _, _ = comfy_fp8_file("flux1")
    file[PREFIX + "img_in.comfy_quant"] = marker({"format": "float8_e4m3fn"})
    config_dir, weights = write(tmp_path, "flux1", file)
    with pytest.raises(DiffgenError, match=r"img_in.comfy_quant.* says float8_e4m3fn but img_in.weight is float32"):
        load(config_dir, weights)
    file.pop(PREFIX + "img_in.comfy_quant")
    file[PREFIX + f"{QKV}.comfy_quant"] = torch.zeros(4, dtype=torch.int32)
    save_file(file, str(weights))
    with pytest.raises(DiffgenError, match=rf"tensor '{PREFIX}{QKV}.comfy_quant' is int32 \[4\], not the uint8 bytes"):
        load(config_dir, weights)


def test_the_header_and_a_marker_tensor_that_disagree_are_named(tmp_path):
    file, _, _ = comfy_fp8_file("flux1")
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {QKV: {"format": "nvfp4"}}})}
    config_dir, weights = write(tmp_path, "flux1", file, metadata)
    with pytest.raises(DiffgenError, match=r"comfy_quant' says 'float8_e4m3fn' but .*_quantization_metadata.*says "
                                           r"'nvfp4'"):
        load(config_dir, weights)


def test_a_header_that_is_not_json_is_named(tmp_path):
    file, _, _ = comfy_fp8_file("flux1", markers="none")
    config_dir, weights = write(tmp_path, "flux1", file, {"_quantization_metadata": "{layers"})
    where = rf"file {re.escape(str(weights))}, __metadata__\['_quantization_metadata'\]"
    with pytest.raises(DiffgenError, match=rf"{where} is not valid"):
        load(config_dir, weights)


# -- the layout pass ------------------------------------------------------------------------------
def tiles(scale: torch.Tensor) -> torch.Tensor:
    """[R, C] -> stored [Rp, Cp]: row 128i + 32j + t, column 4l + m at byte (i, l) * 512 + 16t + 4j + m."""
    rows, cols = scale.shape
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    out = torch.zeros(rp * cp, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            out[((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] = \
                scale.view(torch.uint8)[r, c]
    return out.reshape(rp, cp).view(torch.float8_e4m3fn)


def test_tiles_the_shape_betrays_become_rows_before_the_fused_linear_is_cut(tmp_path):
    e4m3 = torch.float8_e4m3fn
    expected = {"a.weight": ((96, 32), torch.float32), "b.weight": ((256, 256), torch.float32)}
    target = RepackTarget("layout", "X", {}, expected)
    a = torch.randint(1, 120, (96, 2), dtype=torch.uint8).view(e4m3)  # 96 x 2 block scales: stored 128 x 4
    b = torch.randint(1, 120, (256, 16), dtype=torch.uint8).view(e4m3)  # 256 x 16: the tiled shape is the same
    stream = [(f"{PREFIX}a.comfy_quant", marker({"format": "nvfp4"})), (f"{PREFIX}a.weight_scale", tiles(a)),
              ("b.weight_scale", tiles(b)), ("fused.weight_scale", tiles(a))]
    out = dict(comfy.rows_from_tiles(iter(stream), target, lambda m: ["a"] if m == "fused" else []))
    assert list(out) == [f"{PREFIX}a.weight_scale", "b.weight_scale", "fused.weight_scale"]  # the marker is gone
    assert torch.equal(out[f"{PREFIX}a.weight_scale"].view(torch.uint8), a.view(torch.uint8))
    assert torch.equal(out["fused.weight_scale"].view(torch.uint8), a.view(torch.uint8))  # the grid of its parts
    assert torch.equal(out["b.weight_scale"].view(torch.uint8), tiles(b).view(torch.uint8))  # left to the markers
    runtime = RepackTarget("runtime", "X", {}, expected)
    kept = dict(comfy.rows_from_tiles(iter(stream[1:2]), runtime, lambda m: []))
    assert kept[f"{PREFIX}a.weight_scale"].shape == (128, 4)  # only the layout pass knows the 16-bit grid
    meta = dict(comfy.rows_from_tiles(iter([("a.weight_scale", torch.empty(128, 4, dtype=e4m3, device="meta"))]),
                                      target, lambda m: []))
    assert meta["a.weight_scale"].shape == (96, 2)  # the planner's header pass sees the row-major shape
