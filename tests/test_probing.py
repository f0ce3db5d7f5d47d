"""A quantized weights file given in place of a 16-bit transformer's weights is recognised from
what it holds (SGLang's --transformer-weights-path probing): a declaration beside the weights, a
quantization_config in the safetensors metadata, or the tensor families alone. A quantized tensor
is never taken for a 16-bit one, and formats no plugin loads are named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.cli import main
from diffgen.errors import QuantConfigError
from diffgen.linear import QuantLinear

from .conftest import cosine, run

FP8 = torch.float8_e4m3fn
BLOCK_LINEARS = ("attn.to_", "ff.net", "proj_mlp", "proj_out", "norm")  # everything inside the blocks


def _modelopt_style(flux_dir, *, input_scale=True, scales=True) -> dict[str, torch.Tensor]:
    """The base weights with every block linear as ModelOpt writes FP8: e4m3fn weight, fp32 scalar
    weight_scale = amax / 448 (a dequant multiplier) and a static input_scale."""
    base = load_file(flux_dir / "diffusion_pytorch_model.safetensors")
    out = {}
    for name, w in base.items():
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and w.dim() == 2 and "blocks." in name:
            scale = w.abs().amax().float() / 448 if scales else torch.tensor(1.0)
            out[name] = (w.float() / scale).to(FP8)
            if scales:
                out[f"{prefix}.weight_scale"] = scale.reshape(())
            if input_scale:
                out[f"{prefix}.input_scale"] = torch.tensor(0.05)
        else:
            out[name] = w
    return out


def _dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The format's definition: W = W_fp8 * weight_scale (a missing scale is one)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        if t.dtype == FP8:
            scale = tensors.get(name[: -len(".weight")] + ".weight_scale", torch.tensor(1.0))
            t = t.float() * scale
        out[name] = t
    return out


@pytest.fixture
def fp8_file(flux_dir, tmp_path):
    tensors = _modelopt_style(flux_dir)
    path = tmp_path / "flux-fp8.safetensors"
    save_file(tensors, path)
    return path, tensors


def test_fp8_weights_with_no_declaration_load_as_fp8(flux_dir, fp8_file, flux_inputs):
    path, tensors = fp8_file
    model = diffgen.load_transformer(flux_dir, weights_path=path, device="cpu")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quant and all("blocks." in n for n in quant)
    for name, layer in quant.items():  # the bytes and scales of the file, untouched
        assert torch.equal(layer.weight.view(torch.uint8), tensors[f"{name}.weight"].view(torch.uint8))
        assert layer.method.static
    claim = model.diffgen_plan.claim
    assert claim.config.family == "fp8" and "no quantization declared" in claim.evidence
    reference = diffgen.load_transformer(flux_dir, device="cpu")
    reference.load_state_dict(_dequantized(tensors))
    # Static per-tensor FP8 activations on a tiny random model: the rounding of both operands
    # bounds the error well inside 0.99 (the FP8 linears' gate elsewhere in the suite).
    assert cosine(run(model, flux_inputs), run(reference, flux_inputs)) > 0.99


def test_inspect_never_calls_quantized_tensors_16bit(flux_dir, fp8_file):
    report = diffgen.inspect(flux_dir, weights_path=fp8_file[0], device="cpu")
    assert report["winner"]["config"]["family"] == "fp8"
    assert report["weight_bytes"]["planned"] < 0.6 * report["weight_bytes"]["16bit"]


def test_declaration_in_safetensors_metadata_is_read(flux_dir, tmp_path):
    tensors = _modelopt_style(flux_dir, input_scale=False)
    path = tmp_path / "declared.safetensors"
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    save_file(tensors, path, metadata={"quantization_config": json.dumps(qc)})
    model = diffgen.load_transformer(flux_dir, weights_path=path, device="cpu")
    assert f"safetensors metadata of {path}" in model.diffgen_plan.claim.evidence
    assert not any(m.method.static for m in model.modules() if isinstance(m, QuantLinear))


def test_declaration_beside_the_weights_wins_over_a_16bit_base(flux_dir, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    save_file(_modelopt_style(flux_dir), export / "model.safetensors")
    (export / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "activation_scheme": "static"}}))
    model = diffgen.load_transformer(flux_dir, weights_path=export, device="cpu")
    assert "beside the weights" in model.diffgen_plan.claim.evidence


def test_unscaled_fp8_cast_loads_with_a_scale_of_one(flux_dir, tmp_path, flux_inputs):
    # ComfyUI's plain FP8 files: the block weights cast to e4m3fn, no scales at all.
    tensors = _modelopt_style(flux_dir, input_scale=False, scales=False)
    path = tmp_path / "cast.safetensors"
    save_file(tensors, path)
    model = diffgen.load_transformer(flux_dir, weights_path=path, device="cpu")
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer, QuantLinear) and float(layer.weight_scale) == 1.0
    reference = diffgen.load_transformer(flux_dir, device="cpu")
    reference.load_state_dict(_dequantized(tensors))
    assert cosine(run(model, flux_inputs), run(reference, flux_inputs)) > 0.99


def test_online_quantization_of_fp8_tensors_is_refused(flux_dir, fp8_file):
    with pytest.raises(QuantConfigError, match="already quantized.*float8_e4m3fn weights"):
        diffgen.load_transformer(flux_dir, weights_path=fp8_file[0], quantization="fp8", device="cpu")


def test_quantized_tensors_no_plugin_knows_are_an_error_naming_them(flux_dir, tmp_path):
    tensors = load_file(flux_dir / "diffusion_pytorch_model.safetensors")
    name = "transformer_blocks.0.attn.to_q.weight"
    w = tensors.pop(name)
    tensors[name] = torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8)  # packed 4-bit codes
    tensors[name.replace(".weight", ".weight_scale")] = torch.ones(w.shape[0], w.shape[1] // 16).to(FP8)
    path = tmp_path / "packed.safetensors"
    save_file(tensors, path)
    for call in (diffgen.load_transformer, diffgen.inspect):
        with pytest.raises(QuantConfigError, match=r"^cannot load this checkpoint: no installed plugin recognises "
                                                   r"its quantized tensors: .*1 uint8 \(e.g. transformer_blocks.0"):
            call(flux_dir, weights_path=path, device="cpu")


@pytest.mark.parametrize("method, says", [
    ("torchao", "torchao tensor-subclass save (quant_method 'torchao'): no diffgen plugin loads it"),
    ("sdnq", "SD.Next SDNQ save (quant_method 'sdnq'): no diffgen plugin loads it"),
    ("gguf", "GGUF (quant_method 'gguf'): no diffgen plugin loads it"),
])
def test_foreign_formats_are_named_not_sent_to_a_plugin_that_cannot_help(flux_dir, tmp_path, method, says):
    ckpt = tmp_path / "t"
    ckpt.mkdir()
    (ckpt / "diffusion_pytorch_model.safetensors").symlink_to(flux_dir / "diffusion_pytorch_model.safetensors")
    config = json.loads((flux_dir / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    with pytest.raises(QuantConfigError) as err:
        diffgen.load_transformer(ckpt, device="cpu")
    assert says in str(err.value) and "pip install" not in str(err.value)


def test_quanto_tensors_are_named_by_their_format(flux_dir, tmp_path):
    tensors = load_file(flux_dir / "diffusion_pytorch_model.safetensors")
    name = "transformer_blocks.0.attn.to_q"
    w = tensors.pop(f"{name}.weight")
    tensors[f"{name}.weight._data"] = torch.zeros(w.shape, dtype=torch.int8)
    tensors[f"{name}.weight._scale"] = torch.ones(w.shape[0], 1)
    path = tmp_path / "quanto.safetensors"
    save_file(tensors, path)
    with pytest.raises(QuantConfigError, match=r"optimum-quanto save \(quant_method 'quanto'\): no diffgen plugin"):
        diffgen.load_transformer(flux_dir, weights_path=path, device="cpu")


def test_generate_takes_an_fp8_weights_file_with_a_16bit_pipeline(tmp_path, capsys):
    from diffgen.tiny.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("flux1", tmp_path / "pipe")
    weights = tmp_path / "fp8.safetensors"
    save_file(_modelopt_style(pipe / "transformer"), weights)
    assert main(["generate", "--model-path", str(pipe), "--transformer-weights-path", str(weights),
                 "--prompt", "x", "--num-inference-steps", "1", "--height", "64", "--width", "64",
                 "--output-path", str(tmp_path / "out"), "--perf-json", str(tmp_path / "perf.json"), "--quiet"]) == 0
    perf = json.loads((tmp_path / "perf.json").read_text())
    assert "fp8" in perf["methods"]["transformer"]["transformer_blocks.*.attn.to_q"], perf["methods"]
