"""ModelOpt NVFP4 exports (written by nvidia-modelopt 0.47 on the CPU, tests/fixtures/*-nvfp4) load
on any machine through the reference method, in every form the export is published in."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from make_modelopt_fixtures import fixture_transformer
from modelopt_fixtures import copy_export, cosine, export_dir, nvfp4_definition, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.checkpoint import open_checkpoint
from diffgen.errors import LoadError
from diffgen.linear import QuantLinear
from diffgen.numerics.nvfp4 import dequantize_nvfp4, fake_quantize_nvfp4
from diffgen.tiny.transformers import tiny_transformer_inputs
from diffgen_cuda import modelopt

WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPORTS = {"flux1-nvfp4": "flux1", "flux1-w4a16-nvfp4": "flux1", "flux2-nvfp4": "flux2", "wan-nvfp4": "wan",
           "qwen_image-nvfp4": "qwen_image", "hunyuan_video-nvfp4": "hunyuan_video",
           # NVFP4_SVD (smoothing + low-rank branch) and NVFP4_AWQ (smoothing): test_nvfp4_smoothed.py
           "flux1-nvfp4-svdquant": "flux1", "wan-nvfp4-svdquant": "wan", "flux1-nvfp4-awq": "flux1"}


def load(path, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_and_computes_the_definition_with_the_files_bytes(name):
    model = load(export_dir(name))
    plan = model.diffgen_plan
    assert plan.claim.plugin == "cuda" and plan.config.family == "nvfp4"
    assert plan.config.scheme == ("w4a16" if "w4a16" in name else "w4a4")
    file = load_file(export_dir(name) / WEIGHTS)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers and {n for n in layers} == {k[: -len(".weight_scale_2")] for k in file if k.endswith("_scale_2")}
    for name_, layer in layers.items():
        x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(len(name_)))
        expected = nvfp4_definition(file, name_, x, w4a4=plan.config.scheme != "w4a16")
        assert torch.equal(layer(x), expected), name_


@pytest.mark.parametrize("name", EXPORTS)
def test_export_stays_close_to_the_16bit_model_it_was_made_from(name):
    family = EXPORTS[name]
    base = fixture_transformer(family, torch.float32)  # the seed-0 weights ModelOpt quantized
    inputs = tiny_transformer_inputs(family, base, seed=1)
    # 4-bit weights (and activations, W4A4) on tiny random models: 0.988 to 0.9996 measured; the
    # gate leaves room for the float noise of other torch builds.
    assert cosine(run(load(export_dir(name)), inputs), run(base, inputs)) > 0.98


def test_inspect_shows_the_method_and_a_quarter_of_the_bytes():
    report = diffgen.inspect(export_dir("flux1-nvfp4"), device="cpu", dtype="bf16")
    methods = {g["method"] for g in report["groups"] if g["action"] == "quantize"}
    assert methods == {"nvfp4-reference"}
    quantized = [g for g in report["groups"] if g["action"] == "quantize"]
    assert quantized and report["winner"]["config"]["family"] == "nvfp4"
    # packed codes (0.5 byte) + one e4m3 scale per 16 (0.0625 byte) per element, vs 2 bytes in bf16
    model = load(export_dir("flux1-nvfp4"))
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    per_weight = (layer.weight.numel() + layer.weight_scale.numel() + 8) / (layer.in_features * layer.out_features * 2)
    assert abs(per_weight - 0.28125) < 0.04


def _without_config(tmp_path, name="flux1-nvfp4"):
    ckpt = copy_export(name, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    qc = config.pop("quantization_config")
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, qc


def test_nested_hf_quant_config(tmp_path):
    ckpt, qc = _without_config(tmp_path)
    (ckpt / "hf_quant_config.json").write_text(json.dumps({
        "producer": qc["producer"], "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                     "kv_cache_quant_algo": None, "exclude_modules": qc["ignore"]}}))
    plan = load(ckpt).diffgen_plan
    assert plan.config.family == "nvfp4" and "hf_quant_config.json" in plan.claim.evidence


def test_config_in_the_safetensors_metadata(tmp_path):
    ckpt, qc = _without_config(tmp_path)
    tensors = load_file(ckpt / WEIGHTS)
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt", "quantization_config": json.dumps(qc)})
    plan = load(ckpt).diffgen_plan
    assert plan.config.family == "nvfp4" and "safetensors metadata" in plan.claim.evidence


def test_modelopts_single_file_export_options_load_to_the_plain_exports_layers():
    """enable_swizzle_layout + padding_strategy="row_col" + enable_layerwise_quant_metadata (the same
    model, calibration and ModelOpt as flux1-nvfp4): tiled scales untiled, padding cut, and its
    per-layer header not taken for ComfyUI's markers (which would swap the nibbles)."""
    options, plain = load(export_dir("flux1-nvfp4-single-file-options")), load(export_dir("flux1-nvfp4"))
    stored = load_file(export_dir("flux1-nvfp4-single-file-options") / WEIGHTS)
    assert stored["transformer_blocks.0.attn.to_q.weight_scale"].shape == (128, 16)  # [16, 1] padded and tiled
    assert stored["transformer_blocks.0.attn.to_q.weight"].shape == (16, 16)  # [16, 8] padded
    assert "128x4-tiled, as ModelOpt's enable_swizzle_layout" in options.diffgen_plan.claim.evidence
    assert not options.diffgen_plan.config.param("swap_weight_nibbles")
    plain_layers = dict(plain.named_modules())
    checked = 0
    for name, layer in options.named_modules():
        if isinstance(layer, QuantLinear):
            for leaf in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
                got, ref = getattr(layer, leaf), getattr(plain_layers[name], leaf)
                assert got.dtype == ref.dtype and torch.equal(got.float(), ref.float()), f"{name}.{leaf}"
            checked += 1
    assert checked == 28


def test_padding_that_is_not_zero_stops_the_load_naming_the_tensor(tmp_path):
    ckpt = copy_export("flux1-nvfp4-single-file-options", tmp_path / "ckpt")
    with safe_open(ckpt / WEIGHTS, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["transformer_blocks.0.attn.to_q.weight"][:, -1] = 0x11  # past the layer's 8 bytes of codes per row
    save_file(tensors, ckpt / WEIGHTS, metadata=metadata)
    with pytest.raises(LoadError, match=r"transformer_blocks\.0\.attn\.to_q\.weight is stored \[16, 16\] for a layer "
                                        r"that needs \[16, 8\], and what lies past that is not zero.*\(file .*diffusion_pytorch_model\.safetensors\)"):
        load(ckpt)


def _single_layer_export(tmp_path, layout: str | None, header: bool = True):
    """A ModelOpt-style NVFP4 file of one 128 x 64 layer: at that shape its block scales [128, 4] are
    tiled or row-major alike, so only a declaration can say which."""
    from diffgen.numerics.nvfp4 import quantize_nvfp4

    ckpt = tmp_path / "single"
    ckpt.mkdir()
    packed, scale, global_scale = quantize_nvfp4(torch.randn(128, 64, generator=torch.Generator().manual_seed(0)))
    qc = {"quant_method": "modelopt", "quant_algo": "NVFP4", "producer": {"name": "modelopt", "version": "0.47.0"},
          **({"checkpoint_weight_scale_layout": layout} if layout else {})}
    (ckpt / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "quantization_config": qc}))
    metadata = {"format": "pt", "quantization_config": json.dumps(qc)}
    if header:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": {"blocks.0.linear": {"format": "nvfp4"}}})
    save_file({"blocks.0.linear.weight": packed, "blocks.0.linear.weight_scale": scale,
               "blocks.0.linear.weight_scale_2": global_scale, "blocks.0.linear.input_scale": torch.tensor(0.01)},
              ckpt / WEIGHTS, metadata=metadata)
    return modelopt.detect(open_checkpoint(ckpt))


def test_when_shapes_cannot_tell_tiles_from_rows_modelopts_single_file_header_asks_for_the_layout(tmp_path):
    claim = _single_layer_export(tmp_path, None)
    assert "tiled and row-major scales look alike" in claim.unsupported_reason
    assert "checkpoint_weight_scale_layout" in claim.unsupported_reason


@pytest.mark.parametrize("layout", ["swizzled", "linear"])
def test_a_declared_layout_settles_it(tmp_path, layout):
    claim = _single_layer_export(tmp_path, layout)
    assert claim.unsupported_reason is None
    assert claim.config.param("weight_scale_layout") == ("swizzled" if layout == "swizzled" else None)
    assert not claim.config.param("swap_weight_nibbles")


def test_a_plain_modelopt_export_of_those_shapes_is_row_major(tmp_path):
    claim = _single_layer_export(tmp_path, None, header=False)  # no header: no single-file options ran
    assert claim.unsupported_reason is None and claim.config.param("weight_scale_layout") is None


def test_tensors_alone_say_nvfp4(tmp_path):
    ckpt, _ = _without_config(tmp_path)
    plan = load(ckpt).diffgen_plan
    assert plan.config.family == "nvfp4" and plan.claim.evidence.startswith("no quantization declared; 28 NVFP4")
    assert set(plan.kept()) == {"proj_out", "single_transformer_blocks.0.proj_out"}  # stored 16-bit


def test_the_tensors_win_over_a_stale_ignore_list(tmp_path):
    ckpt = copy_export("flux1-nvfp4", tmp_path / "stale")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["ignore"] += ["transformer_blocks.0.attn.to_*"]  # but they hold NVFP4 tensors
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "transformer_blocks.0.attn.to_q" in load(ckpt).diffgen_plan.quantized()


def test_layers_exported_without_input_scale_quantize_activations_per_call(tmp_path):
    ckpt = copy_export("flux1-nvfp4", tmp_path / "mixed")
    tensors = load_file(ckpt / WEIGHTS)
    del tensors["transformer_blocks.0.attn.to_q.input_scale"]
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    model = load(ckpt)
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert layer.method.scheme == "w4a4-dynamic" and not hasattr(layer, "input_scale")
    x = torch.randn(4, layer.in_features)
    global_scale = x.abs().amax() / (6 * 448)
    w = dequantize_nvfp4(layer.weight, layer.weight_scale, layer.weight_scale_2, k=layer.in_features)
    assert torch.equal(layer(x), F.linear(fake_quantize_nvfp4(x, global_scale), w, layer.bias))


def test_nvfp4_weights_given_as_weights_path_over_a_16bit_base(tmp_path):
    base = tmp_path / "base"
    fixture_transformer("flux1", torch.bfloat16).save_pretrained(base)
    plan = load(base, weights_path=export_dir("flux1-nvfp4")).diffgen_plan
    assert plan.config.family == "nvfp4" and "beside the weights" in plan.claim.evidence


def test_the_triton_method_is_offered_with_the_reason_it_cannot_run_here():
    from diffgen.platform import Platform
    from diffgen.quant import LayerSpec, QuantConfig
    from diffgen_cuda import nvfp4, nvfp4_w4a8

    def offers_for(layer, platform):
        return nvfp4.offer(config, layer, platform) + nvfp4_w4a8.offer(config, layer, platform)

    config = QuantConfig.make("nvfp4", scheme="w4a4")
    layer = LayerSpec("a", 64, 32, True, torch.bfloat16)
    offers = {m.name: m for m in offers_for(layer, Platform("cpu", "cpu", "x86"))}
    assert offers["nvfp4-reference"].unavailable_reason is None
    assert "CUDA" in offers["nvfp4-triton-dequant"].unavailable_reason
    assert "CUDA" in offers["nvfp4-triton-w4a8"].unavailable_reason
    ada = Platform("cuda", "cuda:0", "an older GPU", (8, 0))
    reason = offers_for(layer, ada)[1].unavailable_reason
    assert reason is None or "SM89" in reason or "Triton" in reason
    fp32 = LayerSpec("a", 64, 32, True, torch.float32)
    hopper = Platform("cuda", "cuda:0", "H100", (9, 0))
    reason = offers_for(fp32, hopper)[1].unavailable_reason
    assert "bf16 or fp16" in reason or "Triton" in reason


def test_flux2_single_file_in_bfls_layout_quantized_by_diffusers_helper(tmp_path, monkeypatch):
    """A FLUX.2 file in Black Forest Labs' names (fused qkv, the final adaLN halves swapped) whose
    block linears diffusers' own NVFP4 helper quantized (ModelOpt's layout, no input_scale, as
    BFL's mixed file ships), given as weights over a 16-bit config: every layer in diffusers' names
    holds what diffusers' conversion of diffusers' dequantization gives."""
    from diffusers.quantizers.bfl import utils as bfl_utils
    from tests.test_bfl_layout import BLOCK_LINEAR, bfl_state_dict, diffusers_conversion

    from diffgen.tiny.transformers import tiny_transformer

    bfl = bfl_state_dict("flux2", seed=7)
    file, dequantized = {}, {}
    for name, tensor in bfl.items():
        module, _, leaf = name.rpartition(".")
        if module in BLOCK_LINEAR and leaf == "weight":
            packed, scale, scale_2 = bfl_utils.quantize_nvfp4(tensor)
            file[name], file[f"{module}.weight_scale"], file[f"{module}.weight_scale_2"] = packed, scale, scale_2
            dequantized[name] = bfl_utils.dequantize_nvfp4(packed, scale, scale_2).float()
        else:
            file[name] = dequantized[name] = tensor
    weights = tmp_path / "flux2-nvfp4-mixed.safetensors"
    save_file(file, weights)
    config_dir = tmp_path / "transformer"
    tiny_transformer("flux2").save_config(config_dir)
    model = load(config_dir, weights_path=weights)
    plan = model.diffgen_plan
    assert plan.config.family == "nvfp4" and plan.claim.evidence.startswith("no quantization declared")
    expected = diffusers_conversion("flux2", dequantized, monkeypatch)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 12  # the 8 BFL linears, each qkv as 3
    for name, layer in layers.items():
        assert layer.method.scheme == "w4a16"  # no input_scale anywhere and nothing declared: weight-only
        got = dequantize_nvfp4(layer.weight, layer.weight_scale, layer.weight_scale_2, k=layer.in_features)
        # the same three factors multiplied in another order: equal to the last bit or one ulp apart
        assert torch.allclose(got, expected[f"{name}.weight"], rtol=2e-7, atol=0), name


def test_compare_gates_the_export_against_the_16bit_model(tmp_path, capsys):
    from diffgen.cli import main
    from diffgen.tiny.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("flux1", tmp_path / "pipe")
    base = tmp_path / "base"
    fixture_transformer("flux1", torch.bfloat16).save_pretrained(base)  # the model ModelOpt quantized
    report = tmp_path / "compare.json"
    # 4-bit weights and activations of a tiny random model: 0.99 per-step latent cosine is the gate
    # the FP8 formats are held to; measured 0.997 (output PSNR 36.5 dB) on the CPU.
    assert main(["compare", "--model-path", str(pipe), "--reference-transformer-path", str(base),
                 "--candidate-transformer-path", str(export_dir("flux1-nvfp4")), "--prompt", "a fox",
                 "--num-inference-steps", "3", "--height", "64", "--width", "64", "--device", "cpu",
                 "--min-cosine", "0.99", "--output-json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["gates"]["passed"] and result["summary"]["min_step_cosine"] >= 0.99


def test_a_global_scale_that_would_ruin_the_layer_stops_the_load_but_a_zero_block_scale_does_not(tmp_path):
    from diffgen.errors import LoadError

    ckpt = copy_export("flux1-nvfp4", tmp_path / "nan")
    tensors = load_file(ckpt / WEIGHTS)
    name = "transformer_blocks.0.attn.to_q"
    tensors[f"{name}.weight_scale"] = torch.zeros_like(tensors[f"{name}.weight_scale"])  # an all-zero layer: fine
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    assert not load(ckpt).get_submodule(name).weight_scale.float().any()
    tensors[f"{name}.weight_scale_2"] = torch.tensor(float("nan"))
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(LoadError, match=rf"^tensor '{name}.weight_scale_2' in .* holds NaN"):
        load(ckpt)
    tensors[f"{name}.weight_scale_2"] = torch.tensor(-1.0)  # finite, but not a scale
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(LoadError, match=rf"^tensor {name}.weight_scale_2 holds -1.0 .* must be finite and positive"):
        load(ckpt)
