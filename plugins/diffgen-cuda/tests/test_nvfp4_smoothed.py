"""ModelOpt NVFP4_SVD and NVFP4_AWQ exports (tests/fixtures/*-svdquant, *-awq: ModelOpt 0.47's
``svdquant`` and ``awq_lite`` algorithms and its HF export, on the CPU; see make_modelopt_fixtures.py).

Their layers carry ``pre_quant_scale`` (the smoothing) and, for SVD, ``svdquant_lora_a`` /
``svdquant_lora_b`` (a low-rank branch on the smoothed input). The independent check is ModelOpt
itself: before exporting, the fixture script recorded what ModelOpt's quantized linears computed
(``modelopt_layers.safetensors``), and diffgen's reference method, reading only the export, must
give those bits.
"""

from __future__ import annotations

import json

import pytest
import torch
from make_modelopt_fixtures import LAYERS_FILE, LOWRANK, fixture_transformer
from modelopt_fixtures import FIXTURES, copy_export, export_dir, nvfp4_definition
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear, ShardError
from diffgen.quant import LayerSpec
from diffgen_cuda.nvfp4 import Nvfp4TritonDequantMethod
from diffgen_cuda.nvfp4_w4a8 import Nvfp4TritonW4A8Method

WEIGHTS = "diffusion_pytorch_model.safetensors"
SVD = ("flux1-nvfp4-svdquant", "wan-nvfp4-svdquant")
SMOOTHED = SVD + ("flux1-nvfp4-awq",)


def load(path, dtype=torch.float32, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=dtype, **kwargs)


def layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", SMOOTHED)
def test_every_recorded_layer_gives_modelopts_own_bits(name):
    recorded = load_file(FIXTURES / name / LAYERS_FILE)
    model = layers(load(export_dir(name), dtype=torch.bfloat16))  # ModelOpt ran the model in bf16
    file = load_file(export_dir(name) / WEIGHTS)
    checked = 0
    for key, x in recorded.items():
        if not key.endswith(".input"):
            continue
        layer_name = key[: -len(".input")]
        want = recorded[f"{layer_name}.output"]
        with torch.no_grad():
            assert torch.equal(model[layer_name](x), want), layer_name
        # the extras matter: the same layer without them is another function
        plain = {k: v for k, v in file.items() if not k.endswith(("pre_quant_scale", "_lora_a", "_lora_b"))}
        assert not torch.equal(nvfp4_definition(plain, layer_name, x, w4a4=True), want), layer_name
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("name", SMOOTHED)
def test_the_claim_names_each_layers_extras_from_the_tensors(name):
    file = load_file(export_dir(name) / WEIGHTS)
    plan = load(export_dir(name)).diffgen_plan
    smoothed = {k.rsplit(".", 1)[0] for k in file if k.endswith(".pre_quant_scale")}
    branches = {k.rsplit(".", 1)[0] for k in file if k.endswith(".svdquant_lora_a")}
    assert smoothed == {k.rsplit(".", 1)[0] for k in file if k.endswith(".weight_scale_2")}  # every NVFP4 layer
    assert set(plan.config.param("smoothed")) == smoothed
    assert dict(plan.config.param("lowrank") or ()) == {layer: LOWRANK for layer in branches}
    assert bool(branches) == (name in SVD)
    assert "smoothed by AWQ" in plan.claim.evidence
    assert ("low-rank branch of rank 4" in plan.claim.evidence) == (name in SVD)
    assert plan.config.scheme == "w4a4"


def test_the_tensors_alone_say_the_same(tmp_path):
    ckpt = copy_export("flux1-nvfp4-svdquant", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("quantization_config")
    (ckpt / "config.json").write_text(json.dumps(config))
    declared, alone = load(export_dir("flux1-nvfp4-svdquant")), load(ckpt)
    assert alone.diffgen_plan.config.param("lowrank") == declared.diffgen_plan.config.param("lowrank")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    name = "transformer_blocks.0.attn.to_q"
    assert torch.equal(layers(alone)[name](x), layers(declared)[name](x))


def _edited(tmp_path, edit, name="flux1-nvfp4-svdquant"):
    ckpt = copy_export(name, tmp_path / "ckpt")
    tensors = load_file(ckpt / WEIGHTS)
    edit(tensors)
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    return ckpt


def test_a_branch_missing_half_is_refused_naming_the_tensor_and_file(tmp_path):
    ckpt = _edited(tmp_path, lambda t: t.pop("transformer_blocks.0.attn.to_out.0.svdquant_lora_b"))
    with pytest.raises(DiffgenError, match=r"transformer_blocks\.0\.attn\.to_out\.0\.svdquant_lora_a \(in "
                                           r"diffusion_pytorch_model\.safetensors\) has no .*svdquant_lora_b"):
        load(ckpt)


def test_branches_of_two_ranks_are_refused(tmp_path):
    def cut(t):
        key = "transformer_blocks.0.ff.net.2.svdquant_lora_b"
        t[key] = t[key][:, :2].contiguous()

    with pytest.raises(DiffgenError, match=r"ff\.net\.2\.svdquant_lora_a \[4, 64\] and .*svdquant_lora_b \[16, 2\]"):
        load(_edited(tmp_path, cut))


def test_a_declared_svd_export_without_branches_is_refused(tmp_path):
    ckpt = _edited(tmp_path, lambda t: [t.pop(k) for k in list(t) if "svdquant_lora" in k])
    with pytest.raises(DiffgenError, match="declares NVFP4_SVD, but no layer has svdquant_lora_a"):
        load(ckpt)


def test_a_smoothing_of_the_wrong_width_stops_the_load_naming_it(tmp_path):
    def widen(t):
        key = "transformer_blocks.0.norm1.linear.pre_quant_scale"
        t[key] = torch.cat([t[key], t[key]])

    with pytest.raises(DiffgenError, match=r"transformer_blocks\.0\.norm1\.linear\.pre_quant_scale"):
        load(_edited(tmp_path, widen))


def test_the_mixed_bf16_converter_keeps_the_extras_of_what_stays_nvfp4(tmp_path):
    from diffgen_cuda.convert_nvfp4 import convert

    base = tmp_path / "base"
    fixture_transformer("flux1", torch.bfloat16).save_pretrained(base)  # the seed-0 model ModelOpt quantized
    out = tmp_path / "mixed"
    convert(export_dir("flux1-nvfp4-svdquant"), base, out, pattern_preset="flux1-nvfp4")
    converted = layers(load(out))
    exported = layers(load(export_dir("flux1-nvfp4-svdquant")))
    assert "transformer_blocks.0.norm1.linear" not in converted  # the preset keeps it in BF16, smoothing and all
    assert set(converted) < set(exported)
    for name, layer in converted.items():
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
        assert layer.method.rank == LOWRANK and layer.method.smoothed, name
        assert torch.equal(layer(x), exported[name](x)), name


def test_the_native_methods_keep_the_16bit_input_and_their_own_layers():
    config = load(export_dir("flux1-nvfp4-svdquant")).diffgen_plan.config
    spec = LayerSpec("transformer_blocks.0.attn.to_q", 16, 16, True, torch.bfloat16)
    w4a8 = Nvfp4TritonW4A8Method(config, spec)
    # FP8 handed over by a fused producer would skip the smoothing and the branch
    assert w4a8.has_extras and not w4a8.takes_prepared_input(None, 4608)
    plain = Nvfp4TritonW4A8Method(config.__class__.make("nvfp4", scheme="w4a4"), spec)
    assert not plain.has_extras and plain.takes_prepared_input(None, 4608)
    with pytest.raises(ShardError, match="AWQ smoothing or an SVDQuant low-rank branch"):
        Nvfp4TritonDequantMethod(config, spec).tp_shards("colwise", 2)
