"""ModelOpt FP8 exports written by ModelOpt itself load through diffgen and match the 16-bit model.

The exports (tests/fixtures/, see make_modelopt_fixtures.py) are ModelOpt 0.47's CPU output for
diffgen's tiny FLUX.1, Qwen-Image and HunyuanVideo transformers; the 16-bit reference is rebuilt
from the weights in the same run's backbone.pt.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.builtin.fp8_methods import WEIGHT_ONLY_ROWS
from diffgen.errors import QuantConfigError
from diffgen.linear import QuantLinear
from diffgen.tiny.transformers import tiny_transformer_inputs
from modelopt_fixtures import copy_export, cosine, export_dir, run, write_base_transformer

E4M3 = torch.float8_e4m3fn
WEIGHTS = "diffusion_pytorch_model.safetensors"
FAMILIES = ["flux1", "qwen_image", "hunyuan_video"]


def load(path, **kwargs):
    return diffgen.load_transformer(path, dtype=torch.float32, **kwargs)


def definition(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """ModelOpt FP8 written out: static per-tensor activation quantization, per-tensor weights;
    inputs of at most WEIGHT_ONLY_ROWS rows are not quantized (diffgen's rule)."""
    xq = x
    if x.shape[0] > WEIGHT_ONLY_ROWS:
        xq = (x / layer.input_scale).clamp(-448, 448).to(E4M3).float() * layer.input_scale
    return F.linear(xq, layer.weight.float() * layer.weight_scale, layer.bias)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {f: write_base_transformer(f"{f}-fp8", root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_export_loads_and_matches_16bit(family, bases):
    model = load(export_dir(f"{family}-fp8"))
    plan = model.diffgen_plan
    assert plan.claim.plugin == "cuda" and plan.claim.specificity == 30
    assert plan.config.family == "fp8" and plan.config.scheme == "per-tensor"
    assert plan.config.param("activation_scheme") == "static"
    assert "quant_method=modelopt, quant_algo=FP8" in plan.claim.evidence
    kept = {d.layer.name for d in plan.decisions if d.action == "keep"}
    assert "proj_out" in kept  # ModelOpt's ignore; stored BF16 in the export
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers and all(m.weight.dtype == E4M3 for m in layers.values())
    # The loaded bytes are the file's, and each layer computes the format's definition (same
    # operations, fp32 matmul order aside: 1e-5 relative).
    tensors = load_file(export_dir(f"{family}-fp8") / WEIGHTS)
    torch.manual_seed(0)
    for name, layer in list(layers.items())[:6]:
        assert torch.equal(layer.weight.view(torch.uint8), tensors[f"{name}.weight"].view(torch.uint8))
        for rows in (1, 8):
            x = torch.randn(rows, layer.in_features)
            expected = definition(layer, x)
            assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), name
    # Whole model against the 16-bit weights ModelOpt calibrated: e4m3 keeps ~2 significant
    # digits per weight and activation. Seed 1 was a calibration batch, seed 9 was not (static
    # scales clamp activations beyond the calibrated amax).
    reference = load(bases[family])
    for seed in (1, 9):
        inputs = tiny_transformer_inputs(family, reference, seed=seed)
        assert cosine(run(model, inputs), run(reference, inputs)) >= 0.99, seed


def test_fp8_per_channel_per_token_is_builtin_per_channel_dynamic(bases):
    model = load(export_dir("flux1-fp8-per-channel"))
    config = model.diffgen_plan.config
    assert (config.family, config.scheme, config.param("activation_scheme")) == ("fp8", "per-channel", "dynamic")
    assert "FP8_PER_CHANNEL_PER_TOKEN" in model.diffgen_plan.claim.evidence
    reference = load(bases["flux1"])  # the same seed-0 FLUX.1 weights (make_modelopt_fixtures)
    w = reference.x_embedder.weight
    assert torch.allclose(model.x_embedder.weight.float() * model.x_embedder.weight_scale[:, None], w,
                          rtol=2 ** -4, atol=1e-6)
    inputs = tiny_transformer_inputs("flux1", reference, seed=9)
    assert cosine(run(model, inputs), run(reference, inputs)) >= 0.99


def test_an_nvfp4_variant_it_does_not_compute_stops_with_the_algorithm_and_what_is_supported(tmp_path):
    ckpt = copy_export("flux1-nvfp4", tmp_path / "w4a8")
    _edit_config(ckpt, quant_algo="W4A8_NVFP4_FP8")
    with pytest.raises(QuantConfigError) as err:
        load(ckpt)
    message = str(err.value)
    assert "quant_algo=W4A8_NVFP4_FP8" in message and "plugin cuda recognises this format" in message
    assert "does not apply its FP8-range block scales" in message and "W8A8_SQ_PER_CHANNEL and W8A16 (INT8)" in message and "FP8_PB_WO" in message


def _edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_mixed_precision_names_the_per_layer_algorithms(tmp_path):
    ckpt = copy_export("flux1-fp8", tmp_path / "mixed")
    _edit_config(ckpt, quant_algo="MIXED_PRECISION", quantized_layers={
        "x_embedder": {"quant_algo": "FP8"}, "context_embedder": {"quant_algo": "NVFP4", "group_size": 16}})
    with pytest.raises(QuantConfigError, match=r"MIXED_PRECISION \(per-layer algorithms: FP8, NVFP4\)"):
        load(ckpt)


def test_nested_hf_quant_config_json(tmp_path):
    ckpt = copy_export("flux1-fp8", tmp_path / "nested")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["proj_out*"]}}))
    plan = load(ckpt).diffgen_plan
    assert "hf_quant_config.json (quantization.quant_algo=FP8)" in plan.claim.evidence
    kept = {d.layer.name: d.reason for d in plan.decisions if d.action == "keep"}
    assert kept == {"proj_out": "excluded by the checkpoint ('proj_out*')",
                    "single_transformer_blocks.0.proj_out": "excluded by the checkpoint "
                                                            "('single_transformer_blocks.0.proj_out')"}


def test_ignore_entries_are_globs_and_16bit_linears_are_kept(tmp_path):
    """'proj_out' as a glob is exact; the single block's proj_out stays 16-bit only because the
    checkpoint stores it so, which detection adds to the ignore list."""
    ckpt = copy_export("flux1-fp8", tmp_path / "globs")
    _edit_config(ckpt, ignore=["proj_out"])
    config = load(ckpt).diffgen_plan.config
    assert config.ignored_by("proj_out") == ("checkpoint", "proj_out")
    assert config.ignored_by("single_transformer_blocks.0.proj_out") == \
        ("checkpoint", "single_transformer_blocks.0.proj_out")
    assert config.ignored_by("single_transformer_blocks.0.proj_mlp") is None


def test_per_shard_weight_scales_load_per_channel_exactly(tmp_path):
    """A fused layer with one weight_scale per shard (SGLang's merged QKV stores [S]) keeps its
    FP8 bytes; each shard's rows are dequantized with that shard's scale."""
    ckpt = copy_export("flux1-fp8", tmp_path / "shards")
    tensors = load_file(ckpt / WEIGHTS)
    name = "single_transformer_blocks.0.proj_mlp"  # 64 rows: two shards of 32
    w = tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"]
    scales = torch.stack([w[:32].abs().max(), w[32:].abs().max()]) / 448
    tensors[f"{name}.weight"] = (w / scales.repeat_interleave(32)[:, None]).clamp(-448, 448).to(E4M3)
    tensors[f"{name}.weight_scale"] = scales
    a = tensors[f"{name}.input_scale"]
    tensors[f"{name}.input_scale"] = torch.stack([a, a * 0.5])  # per shard; the runtime takes the max
    save_file(tensors, ckpt / WEIGHTS)
    model = load(ckpt)
    assert model.diffgen_plan.config.scheme_for(name) == "per-channel"
    assert "1 with one scale per fused shard" in model.diffgen_plan.claim.evidence
    layer = model.get_submodule(name)
    assert torch.equal(layer.weight_scale, scales.repeat_interleave(32))
    assert torch.equal(layer.input_scale, a)
    x = torch.randn(8, layer.in_features)  # more than WEIGHT_ONLY_ROWS: quantized
    xq = (x / a).clamp(-448, 448).to(E4M3).float() * a
    expected = F.linear(xq, tensors[f"{name}.weight"].float() * scales.repeat_interleave(32)[:, None], layer.bias)
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_quantization_flag_on_a_modelopt_checkpoint_is_refused():
    with pytest.raises(QuantConfigError, match="already quantized"):
        load(export_dir("flux1-fp8"), quantization="fp8")


def test_inspect_shows_the_claim_without_reading_tensors():
    report = diffgen.inspect(export_dir("hunyuan_video-fp8"))
    assert report["winner"]["plugin"] == "cuda"
    assert report["winner"]["config"]["params"] == {"activation_scheme": "static", "checkpoint_format": "modelopt"}
    assert report["layers"]["kept_16bit"] == 2  # proj_out and the single block's proj_out


def test_export_given_as_weights_path_over_a_16bit_base_loads_as_modelopt(bases):
    # SGLang's --transformer-weights-path: the architecture from the base, the quantization from
    # beside the weights (the export's config.json), never a 16-bit load of FP8 tensors.
    model = load(bases["flux1"], weights_path=export_dir("flux1-fp8"))
    plan = model.diffgen_plan
    assert plan.claim.plugin == "cuda" and "beside the weights" in plan.claim.evidence
    reference = load(export_dir("flux1-fp8"))
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            other = reference.get_submodule(name)
            assert torch.equal(layer.weight.view(torch.uint8), other.weight.view(torch.uint8))
            assert torch.equal(layer.weight_scale, other.weight_scale)


def test_export_file_alone_with_no_declaration_is_fp8_from_its_tensors(bases, tmp_path):
    # The safetensors file copied away from its config: the tensors (FP8 weight, weight_scale,
    # input_scale) still say ModelOpt-style FP8; the builtin fp8 family loads it.
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((export_dir("flux1-fp8") / WEIGHTS).read_bytes())
    plan = load(bases["flux1"], weights_path=lone).diffgen_plan
    assert plan.config.family == "fp8" and plan.config.param("activation_scheme") == "static"
    assert "no quantization declared" in plan.claim.evidence


def test_model_saved_by_diffusers_modelopt_quantizer_is_named_with_the_export_to_use(bases, tmp_path):
    ckpt = tmp_path / "diffusers-saved"
    ckpt.mkdir()
    (ckpt / WEIGHTS).write_bytes((bases["flux1"] / WEIGHTS).read_bytes())
    cfg = json.loads((bases["flux1"] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_type": "FP8", "weight_only": False}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "modelopt_state.pth").write_bytes(b"")
    with pytest.raises(QuantConfigError, match=r"^plugin cuda recognises this format but cannot load it: this is a "
                                               r"model saved by diffusers' ModelOpt quantizer.*export_hf_checkpoint"):
        load(ckpt)


def test_modelopts_per_layer_header_for_single_file_runtimes_is_not_taken_for_comfyuis(tmp_path):
    """export_hf_checkpoint(..., enable_layerwise_quant_metadata=True) writes, as nvidia-modelopt 0.47
    does: its quantization_config and a ``_quantization_metadata`` header naming each layer's
    quant_algo ("fp8", which no ComfyUI format is called). The file is ModelOpt's FP8 export still."""
    ckpt = copy_export("flux1-fp8", tmp_path / "headed")
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    tensors = load_file(ckpt / WEIGHTS)
    layers = {k.rsplit(".", 1)[0]: {"format": qc["quant_algo"].lower()} for k in tensors if k.endswith(".weight_scale")}
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt", "quantization_config": json.dumps(qc),
                                                 "_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                                       "layers": layers})})
    headed, plain = load(ckpt), load(export_dir("flux1-fp8"))
    assert headed.diffgen_plan.claim.plugin == "cuda" and headed.diffgen_plan.config == plain.diffgen_plan.config
    inputs = tiny_transformer_inputs("flux1", headed, seed=1)
    assert torch.equal(run(headed, inputs), run(plain, inputs))
