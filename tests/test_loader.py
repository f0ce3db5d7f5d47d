"""The loader against diffusers itself, and its errors on checkpoints that do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import diffgen
from diffgen import loader
from diffgen.errors import LoadError, QuantConfigError
from diffgen.linear import QuantLinear
from diffgen.tiny.transformers import save_tiny_transformer
from tests.conftest import cosine, run

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(directory, edit):
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16bit_load_is_identical_to_diffusers(flux_dir, flux_inputs, dtype):
    reference = FluxTransformer2DModel.from_pretrained(flux_dir, torch_dtype=dtype)
    # diffusers leaves parameters inside the mmap'd file at arbitrary offsets, and CPU GEMM
    # results depend on the data pointer's alignment (last-bit differences); clone into torch's
    # aligned allocator so the comparison is about values, not addresses.
    for p in reference.parameters():
        p.data = p.data.clone()
    ours = diffgen.load_transformer(flux_dir, dtype=dtype)
    assert not any(isinstance(m, QuantLinear) for m in ours.modules())
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in flux_inputs.items()}
    assert torch.equal(run(ours, inputs), run(reference, inputs))
    assert ours.dtype == dtype


def test_missing_tensor_is_named(flux_dir, tmp_path):
    ckpt = _copy(flux_dir, tmp_path)
    _edit_tensors(ckpt, lambda t: t.pop("proj_out.weight"))
    with pytest.raises(LoadError, match=r"missing.*proj_out\.weight"):
        diffgen.load_transformer(ckpt, dtype=torch.float32)


def test_unexpected_tensor_is_named(flux_dir, tmp_path):
    ckpt = _copy(flux_dir, tmp_path)
    _edit_tensors(ckpt, lambda t: t.__setitem__("stray.weight", torch.zeros(2)))
    with pytest.raises(LoadError, match=r"unexpected.*stray\.weight"):
        diffgen.load_transformer(ckpt, dtype=torch.float32)


def test_wrong_shape_names_tensor_and_file(flux_dir, tmp_path):
    ckpt = _copy(flux_dir, tmp_path)
    _edit_tensors(ckpt, lambda t: t.__setitem__("proj_out.weight", torch.zeros(3, 5)))
    with pytest.raises(LoadError, match=r"proj_out\.weight.*diffusion_pytorch_model\.safetensors.*shape \(3, 5\)"):
        diffgen.load_transformer(ckpt, dtype=torch.float32)


def test_unknown_model_class(flux_dir, tmp_path):
    ckpt = _copy(flux_dir, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["_class_name"] = "NoSuchTransformer"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="NoSuchTransformer"):
        diffgen.load_transformer(ckpt)


def test_unknown_quant_method_is_not_loaded_as_16bit(flux_dir, tmp_path):
    ckpt = _copy(flux_dir, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mystery4"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantConfigError, match="mystery4.*no diffgen plugin loads it"):
        diffgen.load_transformer(ckpt)


def test_online_request_on_a_quantized_checkpoint_is_an_error(flux_dir, tmp_path):
    fp8_dir = tmp_path / "fp8"
    diffgen.quantize(flux_dir, fp8_dir)
    with pytest.raises(QuantConfigError, match="already quantized"):
        diffgen.load_transformer(fp8_dir, quantization="fp8")


def test_online_quantization_never_holds_more_than_one_16bit_layer(flux_dir, monkeypatch):
    """Each layer is quantized as soon as its tensors arrive, so 16-bit weights of quantized
    layers never accumulate on the device."""
    peak = {"bytes": 0, "largest": 0}
    assign = loader._assign

    def watching_assign(model, name, tensor):
        assign(model, name, tensor)
        held = [m.weight for m in model.modules() if isinstance(m, QuantLinear)
                and m.weight.device.type != "meta" and m.weight.dtype != torch.float8_e4m3fn]
        peak["bytes"] = max(peak["bytes"], sum(w.numel() * w.element_size() for w in held))
        if held:
            peak["largest"] = max(peak["largest"], max(w.numel() * w.element_size() for w in held))

    monkeypatch.setattr(loader, "_assign", watching_assign)
    model = diffgen.load_transformer(flux_dir, quantization="fp8", dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert 0 < peak["bytes"] <= peak["largest"]


def test_quantization_ignored_layers_keep_nn_linear(flux_dir, flux_inputs):
    model = diffgen.load_transformer(flux_dir, quantization="fp8", dtype=torch.float32,
                                     quantization_ignored_layers=["norm1", "proj_out"])
    kept = {d.layer.name: d.reason for d in model.diffgen_plan.decisions if d.action == "keep"}
    user = {n for n, r in kept.items() if "--quantization-ignored-layers" in r}
    # Containment, as SGLang-Diffusion documents it: "norm1" is in norm1_context too.
    assert user == {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear", "proj_out",
                    "single_transformer_blocks.0.proj_out"}
    # Embedders and the final norm stay 16-bit by default when quantizing online.
    assert {n for n, r in kept.items() if "precision-sensitive" in r} == {
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
        "context_embedder", "x_embedder", "norm_out.linear"}
    assert type(model.get_submodule("proj_out")) is torch.nn.Linear
    assert model.get_submodule("proj_out").weight.dtype == torch.float32


def test_sglang_docs_pattern_keeps_every_attention_projection(flux_dir, caplog):
    model = diffgen.load_transformer(flux_dir, quantization="fp8", quantization_ignored_layers=["attn.to_", "nosuch"])
    kept = set(model.diffgen_plan.kept())
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.to_out.0"} <= kept
    assert "transformer_blocks.0.attn.add_q_proj" not in kept
    assert "--quantization-ignored-layers 'nosuch' matches no linear layer of FluxTransformer2DModel" in caplog.text
    assert "'attn.to_'" not in caplog.text


def test_quantize_all_layers_drops_the_default_ignores(flux_dir):
    model = diffgen.load_transformer(flux_dir, quantization="fp8", quantize_all_layers=True)
    assert model.diffgen_plan.kept() == []


def test_ignored_layers_without_quantization_are_said_to_change_nothing(flux_dir, caplog):
    diffgen.load_transformer(flux_dir, quantization_ignored_layers=["proj_out"])
    assert "without --quantization they change nothing" in caplog.text


def test_quant_backend_with_nothing_quantized_is_an_error(flux_dir):
    with pytest.raises(QuantConfigError, match="^--quant-backend nosuch has nothing to choose for: no layer is "):
        diffgen.load_transformer(flux_dir, quant_backend="nosuch")


def test_inspect_reports_claims_plan_and_bytes(flux_dir):
    report = diffgen.inspect(flux_dir, quantization="fp8", quantization_ignored_layers=["proj_out"])
    assert report["model_class"] == "FluxTransformer2DModel"
    assert report["winner"]["plugin"] == "fp8" and report["winner"]["config"]["online"] is True
    assert "--quantization fp8" in report["winner"]["evidence"]
    kept = [g for g in report["groups"] if g["action"] == "keep" and "ignored-layers" in g["reason"]]
    assert {g["pattern"] for g in kept} == {"proj_out", "single_transformer_blocks.*.proj_out"}
    quantized = [g for g in report["groups"] if g["action"] == "quantize"]
    assert all(g["method"] == "fp8-reference" and g["kind"] == "reference" for g in quantized)
    assert report["layers"]["quantized"] + report["layers"]["kept_16bit"] == 30
    # Quantized linears take about half their bf16 bytes (1-byte weights + fp32 row scales).
    assert 0.45 < report["weight_bytes"]["planned"] / report["weight_bytes"]["16bit"] < 0.75


def test_keep_in_fp32_modules_stay_fp32(tmp_path):
    wan = save_tiny_transformer("wan", tmp_path / "wan", dtype=torch.float32)
    model = diffgen.load_transformer(wan, dtype=torch.bfloat16, quantization="fp8")
    embedder = model.condition_embedder.time_embedder.linear_1
    assert type(embedder) is torch.nn.Linear and embedder.weight.dtype == torch.float32
    assert isinstance(model.blocks[0].attn1.to_q, QuantLinear)
    assert model.blocks[0].attn1.to_q.bias.dtype == torch.bfloat16


def test_quantized_model_refuses_dtype_casts(flux_dir):
    model = diffgen.load_transformer(flux_dir, quantization="fp8", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16  # not the float8 of the first parameter
    with pytest.raises(ValueError, match="quantized"):
        model.to(torch.float16)


def test_online_fp8_output_close_to_16bit(flux_dir, flux_inputs):
    reference = run(diffgen.load_transformer(flux_dir, dtype=torch.float32), flux_inputs)
    quantized = run(diffgen.load_transformer(flux_dir, dtype=torch.float32, quantization="fp8"), flux_inputs)
    assert cosine(quantized, reference) >= 0.99


def test_a_stray_tensor_is_refused_before_any_tensor_is_read(flux_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from diffgen.errors import LoadError
    from diffgen.safetensors_header import SafetensorsFile

    ckpt = _copy(flux_dir, tmp_path)
    weights = ckpt / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["stray.weight"] = torch.zeros(64, 64)
    save_file(tensors, weights)

    def no_reading(self, names=None):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(SafetensorsFile, "iter_tensors", no_reading)
    with pytest.raises(LoadError, match=r"^the checkpoint does not fit FluxTransformer2DModel: 1 unexpected \(e.g. "
                                        r"stray.weight\)"):
        diffgen.load_transformer(ckpt, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_a_weight_holding_nan_is_refused_unless_told(flux_dir, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from diffgen.errors import LoadError
    from diffgen.finite import all_finite

    nan = torch.tensor([1.0, float("nan")])
    assert not all_finite(nan.to(dtype)) and all_finite(torch.ones(3).to(dtype))
    ckpt = _copy(flux_dir, tmp_path)
    weights = ckpt / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = "transformer_blocks.0.attn.to_q.bias"
    tensors[name] = tensors[name].clone()
    tensors[name][3] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(LoadError, match=rf"^tensor '{name}' in .* holds NaN or infinite values"):
        diffgen.load_transformer(ckpt, device="cpu")
    model = diffgen.load_transformer(ckpt, device="cpu", check_weights=False)
    assert torch.isnan(model.get_submodule("transformer_blocks.0.attn.to_q").bias).any()
