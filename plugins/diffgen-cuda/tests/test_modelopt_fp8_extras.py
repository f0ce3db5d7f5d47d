"""``diffgen_cuda.modelopt_fp8``: ModelOpt FP8 exports with SVDQuant's extras (the diffusers example's
``--format fp8 --quant-algo svdquant``: ``flux1-fp8-svdquant``, rank 4) and FP8_PB_WO exports
(``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG``: ``flux1-fp8-block-weight-only``), written by nvidia-modelopt on
the CPU, held to the format's definition computed here from the file, to ModelOpt's own recorded
outputs where recorded, and to the 16-bit model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from make_modelopt_fixtures import LOWRANK, fixture_transformer
from modelopt_fixtures import cosine, edited_export, export_dir, recorded_layers
from safetensors.torch import load_file

import diffgen
from diffgen.linear import QuantLinear, ShardError
from diffgen.quant import LayerSpec
from diffgen.tiny.transformers import tiny_transformer_inputs
from diffgen_cuda.modelopt_fp8 import FAMILY, Fp8ExtrasReferenceMethod, Fp8ExtrasTritonMethod

NAME = "flux1-fp8-svdquant"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def load(path, dtype=torch.float32, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=dtype, **kwargs)


def layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def definition(file: dict, name: str, x: torch.Tensor, extras: bool = True) -> torch.Tensor:
    """The layer from the export's tensors, in float32: the input smoothed, put on the E4M3 grid of
    its static per-tensor input_scale, times weight * weight_scale, plus bias and the branch."""
    get = file.get
    if extras:
        x = x * get(f"{name}.pre_quant_scale").float()
    s = get(f"{name}.input_scale").float()
    xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    w = get(f"{name}.weight").float() * get(f"{name}.weight_scale").float()
    y = F.linear(xq, w, get(f"{name}.bias").float())
    if extras:
        y = y + F.linear(F.linear(x, get(f"{name}.svdquant_lora_a").float()), get(f"{name}.svdquant_lora_b").float())
    return y


def test_the_claim_is_fp8_with_each_layers_extras():
    file = load_file(export_dir(NAME) / WEIGHTS)
    plan = load(export_dir(NAME)).diffgen_plan
    fp8 = {k.rsplit(".", 1)[0] for k, t in file.items() if k.endswith(".weight") and t.dtype == torch.float8_e4m3fn}
    assert plan.config.family == FAMILY and plan.config.scheme == "per-tensor"
    assert plan.config.param("activation_scheme") == "static"
    assert set(plan.config.param("smoothed")) == fp8  # svdquant smooths and branches every quantized layer
    assert dict(plan.config.param("lowrank")) == {layer: LOWRANK for layer in fp8}
    assert "low-rank branch of rank 4" in plan.claim.evidence


def test_every_layer_is_the_definition_and_the_extras_matter():
    file = load_file(export_dir(NAME) / WEIGHTS)
    model = layers(load(export_dir(NAME)))
    assert {type(layer.method) for layer in model.values()} == {Fp8ExtrasReferenceMethod}
    g = torch.Generator().manual_seed(0)
    for name, layer in model.items():
        x = torch.randn(9, layer.in_features, generator=g)  # more rows than FP8's 16-bit few-row path
        with torch.no_grad():
            got = layer(x)
        want = definition(file, name, x)
        assert (got - want).norm() / want.norm() < 1e-3, name
        # the same layer without its smoothing and branch computes something else
        assert (definition(file, name, x, extras=False) - want).norm() / want.norm() > 0.05, name


def test_the_model_is_near_the_16bit_model_it_was_made_from():
    base = fixture_transformer("flux1", torch.float32)  # the seed-0 model ModelOpt quantized
    inputs = tiny_transformer_inputs("flux1", base, seed=7)
    model = load(export_dir(NAME))
    with torch.no_grad():
        want = base(**inputs, return_dict=False)[0]
        got = model(**inputs, return_dict=False)[0]
    # measured on the CPU: 0.99998 (FP8 weights and activations on a tiny random model)
    assert cosine(got, want) > 0.999


def test_a_branch_missing_half_is_refused_naming_the_tensor(tmp_path):
    ckpt = edited_export(NAME, tmp_path / "ckpt", lambda t: t.pop("transformer_blocks.0.attn.to_q.svdquant_lora_a"))
    with pytest.raises(diffgen.errors.DiffgenError, match=r"transformer_blocks\.0\.attn\.to_q\.svdquant_lora_b .*"
                                                          r"no transformer_blocks\.0\.attn\.to_q\.svdquant_lora_a"):
        load(ckpt)


def test_the_native_method_keeps_the_16bit_input_and_its_own_layers():
    config = load(export_dir(NAME)).diffgen_plan.config
    spec = LayerSpec("transformer_blocks.0.attn.to_q", 16, 16, True, torch.bfloat16)
    native = Fp8ExtrasTritonMethod(config, spec, unavailable_reason="not run here")
    assert native.has_extras and not native.takes_prepared_input(None, 4608)
    with pytest.raises(ShardError, match="smoothing or an SVDQuant low-rank branch"):
        native.tp_shards("colwise", 2)
    parts = [layer for name, layer in layers(load(export_dir(NAME))).items()
             if name.startswith("transformer_blocks.0.attn.to_") and name[-1] in "qkv"]
    assert len(parts) == 3 and parts[0].method.fuse(parts, "transformer_blocks.0.attn.to_qkv") is None


def test_fp8_smoothquant_per_channel_input_scales_load_with_their_maximum(tmp_path):
    """ModelOpt's smoothquant skips FP8 layers but leaves their input quantizers per channel: the
    export's input_scale is then [K]. diffgen quantizes with one scale, their maximum, and says so."""
    def per_channel(t):
        key = "transformer_blocks.0.ff.net.2.input_scale"
        t[key] = t[key] * torch.linspace(0.5, 1.0, t["transformer_blocks.0.ff.net.2.weight"].shape[1])

    ckpt = edited_export("flux1-fp8", tmp_path / "ckpt", per_channel)
    model = load(ckpt)
    assert "1 with one input_scale per input channel" in model.diffgen_plan.claim.evidence
    stored = load_file(ckpt / WEIGHTS)["transformer_blocks.0.ff.net.2.input_scale"]
    assert torch.equal(layers(model)["transformer_blocks.0.ff.net.2"].input_scale, stored.max())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU of SM89+ with Triton")
def test_the_gpu_method_is_the_definition_within_fp8_rounding():
    file = load_file(export_dir(NAME) / WEIGHTS)
    model = layers(diffgen.load_transformer(export_dir(NAME), device="cuda", dtype=torch.bfloat16))
    assert {type(layer.method) for layer in model.values()} == {Fp8ExtrasTritonMethod}
    for name, layer in model.items():
        x = torch.randn(300, layer.in_features, device="cuda").bfloat16()
        with torch.no_grad():
            got = layer(x).float().cpu()
        want = definition(file, name, x.float().cpu())
        # bf16 activations, smoothing and output against float32 here
        assert (got - want).norm() / want.norm() < 2e-2, name


def test_the_fp8_converter_refuses_an_export_with_extras_before_writing(tmp_path):
    from diffgen_cuda.convert import convert

    out = tmp_path / "out"
    with pytest.raises(diffgen.errors.DiffgenError, match=r"pre_quant_scale .*loads as it is"):
        convert(export_dir(NAME), tmp_path / "no-backbone.pt", tmp_path / "no-base", out)
    assert not out.exists()


# -- FP8_PB_WO --------------------------------------------------------------------------------
BLOCK_WO = "flux1-fp8-block-weight-only"


def block_definition(file: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """weight * its 128x128 block's scale (stored [N/128, 1, K/128, 1], or one number), 16-bit x."""
    w = file[f"{name}.weight"].float()
    scale = file[f"{name}.weight_scale"].float()
    blocks = scale.reshape(-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    for i in range(blocks.shape[0]):
        for j in range(blocks.shape[1]):
            w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= blocks[i, j]
    bias = file.get(f"{name}.bias")
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def test_a_block_weight_only_export_is_claimed_as_such():
    file = load_file(export_dir(BLOCK_WO) / WEIGHTS)
    plan = load(export_dir(BLOCK_WO)).diffgen_plan
    assert plan.config.family == "modelopt-fp8-pb-wo" and "FP8_PB_WO" in plan.claim.evidence
    assert set(plan.quantized()) == {k[: -len(".weight")] for k, t in file.items()
                                     if k.endswith(".weight") and t.dtype == torch.float8_e4m3fn}
    assert any(t.dim() == 4 for k, t in file.items() if k.endswith(".weight_scale"))  # ModelOpt's block layout


def test_block_weight_only_layers_give_modelopts_bits_and_the_definition():
    model = layers(load(export_dir(BLOCK_WO), dtype=torch.bfloat16))  # ModelOpt ran the model in bf16
    checked = 0
    for name, x, want in recorded_layers(BLOCK_WO):
        with torch.no_grad():
            assert torch.equal(model[name](x), want), name
        checked += 1
    assert checked == 19  # every layer outside the Q/K/V groups
    file = load_file(export_dir(BLOCK_WO) / WEIGHTS)
    for name, layer in layers(load(export_dir(BLOCK_WO))).items():
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(len(name)))
        with torch.no_grad():
            assert torch.allclose(layer(x), block_definition(file, name, x), rtol=1e-5, atol=1e-6), name


def test_a_block_weight_only_export_stays_close_to_the_16bit_model():
    base = fixture_transformer("flux1", torch.float32)
    inputs = tiny_transformer_inputs("flux1", base, seed=7)
    with torch.no_grad():
        want = base(**inputs, return_dict=False)[0]
        got = load(export_dir(BLOCK_WO))(**inputs, return_dict=False)[0]
    assert cosine(got, want) > 0.999


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.__setitem__("time_text_embed.timestep_embedder.linear_1.weight_scale", torch.ones(3)),
     r"timestep_embedder\.linear_1\.weight_scale \(in diffusion_pytorch_model\.safetensors\) has 3 scales"),
    (lambda t: t.__setitem__("transformer_blocks.0.ff.net.2.input_scale", torch.tensor(0.1)),
     r"ff\.net\.2\.input_scale is stored, but FP8_PB_WO leaves the activations 16-bit"),
])
def test_a_block_weight_only_export_that_contradicts_itself_is_refused(tmp_path, edit, match):
    with pytest.raises(diffgen.errors.DiffgenError, match=match):
        load(edited_export(BLOCK_WO, tmp_path / "ckpt", edit))
