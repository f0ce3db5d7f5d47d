"""diffgen-int8wo: the conformance suite, numerics against the format's definition, and
``diffgen generate`` end to end with the installed plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffgen.errors import DiffgenError
from PIL import Image

import diffgen
import diffgen_int8wo.plugin
from diffgen.cli import main
from diffgen.linear import QuantLinear
from diffgen.platform import Platform
from diffgen.quant import LayerSpec, QuantConfig
from diffgen.testing.conformance import PluginConformance
from diffgen.testing.tiny_pipelines import build_tiny_pipeline
from diffgen_int8wo import quantize as quantize_module
from diffgen_int8wo.format import QMAX, dequantize_weight, layer_tensors, quantize_weight
from diffgen_int8wo.methods import (Int8woIntMMMethod, Int8woReferenceMethod, int_mm_unavailable_reason,
                                    quantize_activations_per_token, w8a8_linear)
from diffgen_int8wo.quantize import quantize, write_fixture

CONFIG = QuantConfig.make("int8wo", scheme="per-channel")


class TestInt8woConformance(PluginConformance):
    plugin = diffgen_int8wo.plugin
    plugin_name = "int8wo"
    fixture_writers = {"int8wo": write_fixture}
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


# -- the offline quantizer --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("int8wo") / "flux1", seed=0)


def test_quantizer_writes_atomically(pipeline_dir, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    monkeypatch.setattr(quantize_module, "_verify", lambda *a: (_ for _ in ()).throw(RuntimeError("check failed")))
    with pytest.raises(RuntimeError, match="check failed"):
        quantize(pipeline_dir / "transformer", dst)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary directory is left
    monkeypatch.undo()
    stats = quantize(pipeline_dir / "transformer", dst)
    # The tiny FLUX.1 has 30 linears; diffgen's precision-sensitive defaults keep some 16-bit.
    assert stats["quantized_layers"] + stats["kept_16bit_layers"] == 30 and stats["kept_16bit_layers"] > 0
    with pytest.raises(DiffgenError, match="exists"):
        quantize(pipeline_dir / "transformer", dst)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(dst, tmp_path / "again")
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "int8wo" and "proj_out" in config["ignored_layers"]


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
