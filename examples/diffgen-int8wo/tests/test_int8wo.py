"""diffgen-int8wo: the conformance suite, numerics against the format's definition, what the
plugin publishes beside its hooks (quantizer, converter, rewrite), and ``diffgen generate`` end to
end with the installed plugin."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffgen
import diffgen_int8wo.plugin
from diffgen.cli import main
from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear
from diffgen.platform import Platform
from diffgen.quant import LayerSpec, QuantConfig
from diffgen.testing.conformance import PluginConformance
from diffgen.tiny.pipelines import build_tiny_pipeline
from diffgen_int8wo import quantize as quantize_module
from diffgen_int8wo.format import QMAX, dequantize_weight, layer_tensors, quantize_weight
from diffgen_int8wo.methods import (Int8woIntMMMethod, Int8woReferenceMethod, int_mm_unavailable_reason,
                                    quantize_activations_per_token, w8a8_linear)
from diffgen_int8wo.quantize import write_fixture
from diffgen_int8wo.rewrites import REWRITE


def quantize(src, dst, **kwargs):
    return diffgen.quantize(src, dst, quantization="int8wo", **kwargs)

CONFIG = QuantConfig.make("int8wo", scheme="per-channel")


class TestInt8woConformance(PluginConformance):
    plugin = diffgen_int8wo.plugin
    plugin_name = "int8wo"
    fixture_writers = {"int8wo": write_fixture}
    online_methods = ("int8wo",)
    family = "wan"  # the model its rewrite is for
    rewrites = (REWRITE,)
    declared_tensors = lambda spec: layer_tensors(spec.out_features, spec.in_features)  # noqa: E731
    # int8 per-channel rounding moves a weight by at most 1/254 of its row's max; on the tiny FLUX
    # the reference measures cosine 0.99998 to the 16-bit output.
    reference_min_cosine = 0.999
    # The native method also rounds activations per token to int8 (W8A8), about 0.3% of a row's
    # magnitude per layer; 0.999 leaves room for that and still fails a wrong scale or layout.
    native_min_cosine = 0.999


# -- numerics against the format's definition -------------------------------------------------
def test_quantize_weight_follows_the_definition():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 48)[:, None]
    w[5] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == (48, 64) and scale.dtype == torch.float32 and scale.shape == (48,)
    assert int(q.abs().max()) == QMAX and int(q.min()) >= -QMAX  # -128 is never used
    expected_scale = w.abs().amax(dim=1) / QMAX
    torch.testing.assert_close(scale[expected_scale > 0], expected_scale[expected_scale > 0])
    assert torch.equal(q[5], torch.zeros(64, dtype=torch.int8))
    # Round-to-nearest: every weight within half a step of its dequantized value (fp32 rounding of
    # w / scale and q * scale adds up to ~127 * 2^-23 of a step).
    error = (dequantize_weight(q, scale) - w).abs()
    assert bool((error <= scale[:, None] * (0.5 + 1e-4)).all())


def _layer(method_cls, w: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
    spec = LayerSpec("blocks.0.proj", w.shape[1], w.shape[0], bias is not None, torch.float32)
    layer = QuantLinear(spec, method_cls(CONFIG, spec), dtype=torch.float32)
    layer.weight.data, layer.weight_scale.data = quantize_weight(w)
    if bias is not None:
        layer.bias.data = bias
    layer.method.process_weights_after_loading(layer)
    return layer


def test_reference_method_is_the_definition():
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(32, 48, generator=g), torch.randn(32, generator=g), torch.randn(2, 5, 48, generator=g)
    layer = _layer(Int8woReferenceMethod, w, b)
    q, s = quantize_weight(w)
    expected = x.double() @ (q.double() * s.double()[:, None]).T + b.double()  # float64, from the docstring
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


# -- the native method's argument preparation, on the CPU ------------------------------------
def test_activations_are_quantized_per_token_and_padded_for_int_mm():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.1], [1.0], [30.0]])
    q, scale = quantize_activations_per_token(x)
    assert q.dtype == torch.int8 and q.shape == (17, 32)  # torch._int_mm wants more than 16 rows
    assert scale.shape == (17, 1) and bool((q[3:] == 0).all())
    torch.testing.assert_close(scale[:3, 0], x.abs().amax(dim=1) / QMAX)
    assert bool(((q[:3].float() * scale[:3] - x).abs() <= scale[:3] * (0.5 + 1e-4)).all())
    assert quantize_activations_per_token(torch.randn(40, 32))[0].shape == (40, 32)  # no padding needed


def _int_mm_on_cpu() -> bool:
    try:
        torch._int_mm(torch.zeros(17, 8, dtype=torch.int8), torch.zeros(8, 8, dtype=torch.int8))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _int_mm_on_cpu(), reason="this torch build has no CPU torch._int_mm")
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_w8a8_linear_on_cpu_matches_its_integer_math(rows):
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(24, 32, generator=g), torch.randn(24, generator=g), torch.randn(rows, 32, generator=g)
    q, s = quantize_weight(w)
    y = w8a8_linear(x, q, s, b)
    xq, xs = quantize_activations_per_token(x)
    # Exact integer products in float64, then the same rescale: what _int_mm must compute.
    expected = (xq[:rows].double() @ q.double().T) * xs[:rows].double() * s.double() + b.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-5)
    # And close to the weight-only definition: activation rounding is the only extra error.
    reference = x.double() @ dequantize_weight(q, s, torch.float64).T + b.double()
    assert torch.nn.functional.cosine_similarity(y.double().flatten(), reference.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("platform, layer, reason", [
    (Platform("cpu", "cpu", "cpu"), (64, 64), "this device is cpu"),
    (Platform("cuda", "cuda:0", "T4", (7, 5)), (64, 64), "this GPU is SM75"),
    (Platform("cuda", "cuda:0", "H100", (9, 0)), (60, 64), "K=60, N=64"),
    (Platform("cuda", "cuda:0", "H100", (9, 0)), (64, 64), None),
])
def test_int_mm_availability(platform, layer, reason):
    spec = LayerSpec("blocks.0.proj", layer[0], layer[1], False, torch.bfloat16)
    found = int_mm_unavailable_reason(spec, platform)
    assert (found is None) if reason is None else (reason in found)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of SM80+ for torch._int_mm")
@pytest.mark.parametrize("rows", [1, 77, 4096])
def test_w8a8_linear_on_cuda_matches_the_cpu_emulation(rows):
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(3072, 3072, generator=g) * 0.02, torch.randn(3072, generator=g)
    x = torch.randn(rows, 3072, generator=g)
    layer = _layer(Int8woIntMMMethod, w, b).cuda()
    y = layer(x.cuda().to(torch.bfloat16)).float().cpu()
    q, s = quantize_weight(w)
    xq, xs = quantize_activations_per_token(x.to(torch.bfloat16))
    expected = (xq[:rows].double() @ q.double().T) * xs[:rows].double() * s.double() + b.double()
    # The output is bf16 (8 mantissa bits): 2^-8 relative, plus bf16 rounding of the input.
    torch.testing.assert_close(y.double(), expected, rtol=2 ** -7, atol=2 ** -7 * float(expected.abs().mean()))


# -- the offline quantizer (diffgen quantize --quantization int8wo) ---------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("int8wo") / "flux1", seed=0)


def test_quantizer_checks_what_it_wrote_and_writes_atomically(pipeline_dir, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    failing = dataclasses.replace(quantize_module.QUANTIZER, check_layer=lambda *a: "planted failure")
    monkeypatch.setattr(quantize_module, "QUANTIZER", failing)
    with pytest.raises(DiffgenError, match="verification failed: layer .* planted failure"):
        quantize(pipeline_dir / "transformer", dst)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary directory is left
    monkeypatch.undo()
    assert main(["quantize", str(pipeline_dir / "transformer"), str(dst), "--quantization", "int8wo"]) == 0
    # The tiny FLUX.1 has 30 linears; diffgen's precision-sensitive defaults keep some 16-bit.
    stats = quantize(pipeline_dir / "transformer", tmp_path / "again")
    assert stats["quantized_layers"] + stats["kept_16bit_layers"] == 30 and stats["kept_16bit_layers"] > 0
    with pytest.raises(DiffgenError, match="exists"):
        quantize(pipeline_dir / "transformer", dst)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(dst, tmp_path / "third")
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "int8wo" and "proj_out" in config["ignored_layers"]
    written = load_file(dst / "diffusion_pytorch_model.safetensors")
    source = load_file(pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    q, s = quantize_weight(source["transformer_blocks.0.attn.to_q.weight"])  # the format's definition
    assert torch.equal(written["transformer_blocks.0.attn.to_q.weight"], q)
    assert torch.equal(written["transformer_blocks.0.attn.to_q.weight_scale"], s)


def test_unsupported_variant_is_a_claim_with_a_reason(pipeline_dir, tmp_path):
    dst = tmp_path / "int4"
    quantize(pipeline_dir / "transformer", dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["weight_bits"] = 4
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(diffgen.errors.QuantConfigError, match="cannot load it: .*weight_bits=4"):
        diffgen.load_transformer(dst)


# -- diffgen generate, end to end -------------------------------------------------------------
def _generate(pipeline_dir: Path, out: Path, name: str, *flags: str) -> np.ndarray:
    argv = ["generate", "--model-path", str(pipeline_dir), "--prompt", "a lighthouse at dusk", "--height", "32",
            "--width", "32", "--num-inference-steps", "2", "--device", "cpu", "--output-path", str(out),
            "--output-file-name", name, "--quiet", *flags]
    assert main(argv) == 0
    return np.asarray(Image.open(out / f"{name}.png"), dtype=np.float64)


def test_generate_with_an_int8wo_transformer(pipeline_dir, tmp_path):
    quantize(pipeline_dir / "transformer", tmp_path / "int8wo")
    perf = tmp_path / "perf.json"
    image = _generate(pipeline_dir, tmp_path, "int8wo", "--transformer-path", str(tmp_path / "int8wo"),
                      "--perf-json", str(perf))
    methods = set(json.loads(perf.read_text())["methods"]["transformer"].values())
    assert methods == {"int8wo-reference", "16-bit"}  # found through the installed entry point
    baseline = _generate(pipeline_dir, tmp_path, "16bit")
    other_seed = _generate(pipeline_dir, tmp_path, "16bit-seed1", "--seed", "1")
    # Measured: int8wo differs from the 16-bit image by 0.01 levels on average (at most 1 of 255),
    # another seed by ~46. A bound of 1 level mean / 8 max separates "the same image, rounded"
    # from "another image" by a wide margin.
    assert np.abs(baseline - other_seed).mean() > 10
    assert np.abs(image - baseline).mean() < 1.0 and np.abs(image - baseline).max() <= 8


# -- the converter (diffgen convert int8wo-from-quanto) ----------------------------------------
def write_quanto_checkpoint(src: Path, dst: Path, skip=("proj_out",)) -> Path:
    """What diffusers' QuantoConfig(weights_dtype="int8") saves, written from optimum-quanto's
    definition: per output channel, scale = absmax / 127 in the model's dtype (bf16 here),
    _data = round(W / scale); input_scale and output_scale 1; layers named in skip left 16-bit."""
    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    out = {}
    for name, t in tensors.items():
        layer = name[: -len(".weight")]
        if not name.endswith(".weight") or t.dim() != 2 or layer.rpartition(".")[2] in skip:
            out[name] = t.bfloat16()
            continue
        scale = (t.float().abs().amax(dim=1, keepdim=True) / 127).bfloat16()
        out[f"{name}._data"] = torch.round(t.float() / scale.float()).clamp(-128, 127).to(torch.int8)
        out[f"{name}._scale"] = scale
        for leaf in ("input_scale", "output_scale"):
            out[f"{layer}.{leaf}"] = torch.ones((), dtype=torch.bfloat16)
    dst.mkdir()
    save_file(out, dst / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "quanto", "weights_dtype": "int8",
                                     "modules_to_not_convert": list(skip)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_quanto_checkpoint_converts_losslessly(pipeline_dir, tmp_path):
    quanto = write_quanto_checkpoint(pipeline_dir / "transformer", tmp_path / "quanto")
    assert main(["convert", "int8wo-from-quanto", "--input-dir", str(quanto), "--output-dir",
                 str(tmp_path / "int8wo")]) == 0
    written = load_file(tmp_path / "int8wo" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(quanto / "diffusion_pytorch_model.safetensors")
    layer = "transformer_blocks.0.attn.to_q"
    assert torch.equal(written[f"{layer}.weight"], theirs[f"{layer}.weight._data"])
    assert written[f"{layer}.weight_scale"].dtype == torch.float32
    assert torch.equal(written[f"{layer}.weight_scale"], theirs[f"{layer}.weight._scale"].float().reshape(-1))
    assert "proj_out.weight_scale" not in written and f"{layer}.input_scale" not in written
    model = diffgen.load_transformer(tmp_path / "int8wo", device="cpu", dtype=torch.float32)
    q_layer = model.get_submodule(layer)
    x = torch.randn(5, q_layer.in_features)
    # quanto's dequantization, _data * _scale, is what the loaded layer computes with.
    w = theirs[f"{layer}.weight._data"].float() * theirs[f"{layer}.weight._scale"].float()
    torch.testing.assert_close(q_layer(x), torch.nn.functional.linear(x, w, q_layer.bias), rtol=1e-5, atol=1e-5)


def test_quanto_with_quantized_activations_is_refused(pipeline_dir, tmp_path):
    quanto = write_quanto_checkpoint(pipeline_dir / "transformer", tmp_path / "quanto")
    tensors = load_file(quanto / "diffusion_pytorch_model.safetensors")
    tensors["x_embedder.input_scale"] = torch.tensor(0.02, dtype=torch.bfloat16)
    save_file(tensors, quanto / "diffusion_pytorch_model.safetensors")
    assert main(["convert", "int8wo-from-quanto", "--input-dir", str(quanto), "--output-dir",
                 str(tmp_path / "int8wo")]) == 2
    assert not (tmp_path / "int8wo").exists()


# -- the rewrite (Wan's attention projections) ------------------------------------------------
def test_wan_attention_projections_are_fused_after_loading(tmp_path):
    from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs

    wan = save_tiny_transformer("wan", tmp_path / "wan", seed=0, dtype=torch.float32)
    inputs = tiny_transformer_inputs("wan", tiny_transformer("wan", seed=0), seed=1)
    fused = diffgen.load_transformer(wan, quantization="int8wo", device="cpu", dtype=torch.float32)
    plain = diffgen.load_transformer(wan, quantization="int8wo", device="cpu", dtype=torch.float32, rewrites=False)
    assert fused.diffgen_rewrites == {"blocks.0.attn1": "wan-fused-qkv", "blocks.0.attn2": "wan-fused-qkv"}
    self_attn, cross_attn = fused.get_submodule("blocks.0.attn1"), fused.get_submodule("blocks.0.attn2")
    assert isinstance(self_attn.to_qkv, QuantLinear) and not hasattr(self_attn, "to_k")
    assert isinstance(cross_attn.to_kv, QuantLinear) and isinstance(cross_attn.to_q, QuantLinear)
    with torch.no_grad():
        y, y_plain = (m(**inputs, return_dict=False)[0] for m in (fused, plain))
    # The same int8 rows and scales; only the fp32 matmul's summation order may differ.
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5 * float(y_plain.abs().max()))
