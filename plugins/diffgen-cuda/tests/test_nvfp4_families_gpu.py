"""Every ModelOpt NVFP4 export (tests/fixtures/*-nvfp4, written by nvidia-modelopt 0.47) on a CUDA GPU
of SM89+ with Triton: what load_transformer plans there, and how far each GPU method's output is
from the reference method (the format's definition in PyTorch, ``quant_backend="reference"``) and
from the 16-bit model ModelOpt quantized.

- default: ``nvfp4-triton-w4a8`` (kind native) for every quantized linear whose K and N are
  multiples of 16 (torch._scaled_mm), ``nvfp4-triton-dequant`` for the others;
- ``quant_backend="weight-only"``: ``nvfp4-triton-dequant`` everywhere;
- the five forms the export is published in (flat ``quantization_config``, the nested
  ``quantization`` block inside it, ``hf_quant_config.json``, the config in the safetensors
  metadata, the tensors alone) plan the same methods for FLUX.1.
The same exports on the CPU, through the reference method: test_nvfp4.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from make_modelopt_fixtures import fixture_transformer
from modelopt_fixtures import copy_export, cosine, export_dir, nvfp4_definition, run
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.linear import QuantLinear
from diffgen.tiny.transformers import tiny_transformer_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU of SM89+ (FP8 tensor cores) with Triton"),
]

WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPORTS = {"flux1-nvfp4": "flux1", "flux1-w4a16-nvfp4": "flux1", "flux2-nvfp4": "flux2", "wan-nvfp4": "wan",
           "qwen_image-nvfp4": "qwen_image", "hunyuan_video-nvfp4": "hunyuan_video",
           # NVFP4_SVD / NVFP4_AWQ: each method runs the smoothing and the low-rank branch around its GEMM
           "flux1-nvfp4-svdquant": "flux1", "wan-nvfp4-svdquant": "wan", "flux1-nvfp4-awq": "flux1"}
W4A8, DEQUANT, REFERENCE = "nvfp4-triton-w4a8", "nvfp4-triton-dequant", "nvfp4-reference"
LOWRANK = "nvfp4-triton-w4a8-lowrank"  # W4A8 with the SVDQuant branch folded in: the default where a branch is


def load(path, **kwargs):
    return diffgen.load_transformer(path, device="cuda", dtype=torch.bfloat16, **kwargs)


def methods(model) -> dict[str, str]:
    return {d.layer.name: d.method.name for d in model.diffgen_plan.decisions if d.action == "quantize"}


def _cuda(inputs):
    return {k: (v.cuda().bfloat16() if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


@pytest.fixture(scope="module")
def outputs():
    """name -> (inputs, reference output, 16-bit output), each computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            family = EXPORTS[name]
            base = fixture_transformer(family, torch.bfloat16).cuda()  # the seed-0 weights ModelOpt quantized
            inputs = _cuda(tiny_transformer_inputs(family, base, seed=1))
            reference = load(export_dir(name), quant_backend="reference")
            assert set(methods(reference).values()) == {REFERENCE}
            cache[name] = inputs, run(reference, inputs), run(base, inputs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", EXPORTS)
def test_default_is_w4a8_near_the_reference_and_the_16bit_model(name, outputs):
    model = load(export_dir(name))
    planned = methods(model)
    assert set(planned.values()) & {W4A8, LOWRANK} and set(planned.values()) <= {W4A8, LOWRANK, DEQUANT}
    branches = dict(model.diffgen_plan.config.param("lowrank") or ())
    for decision in model.diffgen_plan.decisions:
        if decision.action == "quantize":
            layer = decision.layer
            fits = layer.in_features % 16 == 0 and layer.out_features % 16 == 0
            fast = LOWRANK if branches.get(layer.name) else W4A8
            assert decision.method.name == (fast if fits else DEQUANT), layer.name
            assert decision.method.kind == ("native" if fits else "weight-only")
    inputs, reference, base = outputs(name)
    out = run(model, inputs)
    assert torch.isfinite(out).all()
    # W4A8 multiplies the same NVFP4 weights re-rounded onto a per-row FP8 grid (E2M1 x E4M3 needs 5
    # significant bits, E4M3 keeps 4) with per-token FP8 activations; the reference quantizes the
    # activations to NVFP4 (W4A4) or not at all (W4A16). Two 8-bit roundings against 4-bit ones:
    # close, not equal. This arithmetic written in PyTorch on the CPU (bf16 models) gave 0.9961
    # (flux2) to 0.9997 against the reference and 0.9913 (flux2) to 0.9999 against the 16-bit
    # model; the gates are test_nvfp4_gpu.py's for FLUX.1 and test_nvfp4.py's for the reference.
    assert cosine(out, reference) > 0.99
    assert cosine(out, base) > 0.98


@pytest.mark.parametrize("name", EXPORTS)
def test_weight_only_is_the_w4a16_definition(name, outputs):
    model = load(export_dir(name), quant_backend="weight-only")
    assert set(methods(model).values()) == {DEQUANT}
    # layer by layer: the Triton pass writes code * block scale * global rounded once to bf16, as
    # diffgen.numerics does, and cuBLAS multiplies that weight with the same bf16 input as
    # F.linear below: the same bits
    # (in the dtype the layer runs in: bf16, or fp32 where diffusers keeps a module in fp32, as Wan's
    # time embedder, whose bias stays fp32 and whose input arrives in fp32)
    file = load_file(export_dir(name) / WEIGHTS)
    torch.manual_seed(0)
    for layer_name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            dtype = layer.compute_dtype if layer.bias is None else layer.bias.dtype
            x = torch.randn(2, 9, layer.in_features, device="cuda").to(dtype)
            with torch.no_grad():
                got, want = layer(x), nvfp4_definition(file, layer_name, x, w4a4=False)
            if f"{layer_name}.weight" in file and not layer.method.has_extras:
                assert torch.equal(got, want), layer_name
            else:
                # fused on the GPU (Q/K/V, ...): the same weights in one GEMM of the parts' widths summed,
                # for which cuBLAS may pick another kernel and sum in another order; or with the
                # smoothing and branch folded (extras.py): bf16 rounding apart
                torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2 * want.abs().max().item(), msg=layer_name)
    inputs, reference, base = outputs(name)
    out = run(model, inputs)
    fused = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and f"{n}.weight" not in file]
    if "w4a16" in name and not fused:
        # the W4A16 reference is that same weight through the same F.linear, in the same modules
        assert torch.equal(out, reference)
    elif "w4a16" in name:
        # ... but a fused layer's GEMM may sum in another order (above): bf16 rounding apart, carried
        # through the blocks
        assert cosine(out, reference) > 0.9999, fused
    else:
        # the W4A4 reference also rounds the activations to NVFP4; weight-only leaves them 16-bit
        # (0.9961 to 0.9997 in the CPU rendering of both)
        assert cosine(out, reference) > 0.99
    assert cosine(out, base) > 0.98  # 4-bit weights on a tiny random model: 0.9937 to 0.9999 on the CPU


def _published_forms(tmp_path) -> dict:
    """The FLUX.1 export rewritten into each form ModelOpt NVFP4 checkpoints are published in."""
    forms = {"flat quantization_config": export_dir("flux1-nvfp4")}

    def without_config(label):
        ckpt = copy_export("flux1-nvfp4", tmp_path / label)
        config = json.loads((ckpt / "config.json").read_text())
        qc = config.pop("quantization_config")
        (ckpt / "config.json").write_text(json.dumps(config))
        return ckpt, config, qc

    ckpt, config, qc = without_config("nested")
    config["quantization_config"] = {"quant_method": "modelopt", "producer": qc["producer"],
                                     "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                      "exclude_modules": qc["ignore"]}}
    (ckpt / "config.json").write_text(json.dumps(config))
    forms["nested quantization"] = ckpt
    ckpt, _, qc = without_config("sidecar")
    (ckpt / "hf_quant_config.json").write_text(json.dumps({
        "producer": qc["producer"], "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                     "kv_cache_quant_algo": None, "exclude_modules": qc["ignore"]}}))
    forms["hf_quant_config.json"] = ckpt
    ckpt, _, qc = without_config("metadata")
    metadata = {"format": "pt", "quantization_config": json.dumps(qc)}
    save_file(load_file(ckpt / WEIGHTS), ckpt / WEIGHTS, metadata=metadata)
    forms["safetensors metadata"] = ckpt
    forms["tensors only"] = without_config("tensors")[0]
    return forms


def test_every_published_form_of_flux1_plans_the_same_methods_on_the_gpu(tmp_path):
    plans = {}
    for label, ckpt in _published_forms(tmp_path).items():
        model = load(ckpt)
        assert model.diffgen_plan.config.family == "nvfp4", label
        plans[label] = (methods(model), sorted(model.diffgen_plan.kept()))
    flat = plans["flat quantization_config"]
    assert W4A8 in flat[0].values()
    assert flat[1] == ["proj_out", "single_transformer_blocks.0.proj_out"]  # ModelOpt's ignore, stored 16-bit
    for label, plan in plans.items():
        assert plan == flat, label
