"""The Blackwell FP4 adapter (nvfp4_blackwell.py). No Blackwell GPU has run it: the operands it
prepares are multiplied back out here in PyTorch and held against the reference method; the real
GEMM calls run only on SM100+ and are skipped elsewhere with that reason."""

from __future__ import annotations

import pytest
import torch

from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear
from diffgen.numerics.nvfp4 import dequantize_nvfp4, quantize_nvfp4, swizzled_to_linear_scales
from diffgen.platform import Platform
from diffgen.quant import LayerSpec, QuantConfig
from diffgen_cuda import nvfp4, nvfp4_blackwell as bw

CONFIG = QuantConfig.make("nvfp4", scheme="w4a4")


def _layer(n: int, k: int, seed: int = 0) -> QuantLinear:
    spec = LayerSpec("l", k, n, True, torch.float32)
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(spec, nvfp4.Nvfp4ReferenceMethod(CONFIG, spec), dtype=torch.float32)
    packed, scale, global_scale = quantize_nvfp4(torch.randn(n, k, generator=g))
    layer.weight.data, layer.weight_scale.data, layer.weight_scale_2.data = packed, scale, global_scale
    layer.input_scale.data = torch.tensor(3.0 / (6 * 448))
    layer.bias.data = torch.randn(n, generator=g)
    return layer


def _multiply_out(op: bw.Fp4Operand, cols: int) -> torch.Tensor:
    """An operand back to fp32 [rows, cols] (global scale 1), from its tiled scales."""
    linear = swizzled_to_linear_scales(op.scale, op.packed.shape[0], op.packed.shape[1] * 2 // 16)
    return dequantize_nvfp4(op.packed, linear, torch.tensor(1.0))[: op.rows, :cols]


@pytest.mark.parametrize("m, n, k", [(5, 48, 64), (130, 200, 80), (1, 16, 16)])
def test_prepared_operands_multiply_to_the_reference(m, n, k):
    layer = _layer(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 2
    a = bw.quantize_activations(x, layer.input_scale)
    b = bw.prepare_weight(layer.weight, layer.weight_scale)
    assert a.packed.shape[1] * 2 % 32 == 0 and b.packed.shape[0] % 32 == 0  # CUTLASS/FlashInfer alignment
    assert b.scale.shape[0] % 128 == 0 and b.scale.shape[1] % 4 == 0 and b.scale.dtype == torch.float8_e4m3fn
    emulated = _multiply_out(a, k) @ _multiply_out(b, k).T * bw.alpha(layer.input_scale, layer.weight_scale_2)
    expected = layer(x) - layer.bias  # the reference method: fake-quantized activations, dequantized weight
    assert torch.allclose(emulated, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_backend_variable_and_sglangs_alias(monkeypatch):
    monkeypatch.delenv(bw.ENV, raising=False)
    monkeypatch.delenv(bw.SGLANG_ENV, raising=False)
    assert bw.fp4_gemm_backend() == "auto"
    monkeypatch.setenv(bw.SGLANG_ENV, "flashinfer_cutlass")
    assert bw.fp4_gemm_backend() == "cutlass"
    monkeypatch.setenv(bw.ENV, "cudnn")
    assert bw.fp4_gemm_backend() == "cudnn"  # ours wins
    monkeypatch.setenv(bw.ENV, "fastest")
    with pytest.raises(DiffgenError, match="not an FP4 GEMM backend; use one of auto, cudnn, cutlass, trtllm, torch"):
        bw.fp4_gemm_backend()


def test_reasons_it_cannot_run(monkeypatch):
    monkeypatch.delenv(bw.ENV, raising=False)
    spec = LayerSpec("l", 64, 64, False, torch.bfloat16)
    hopper = Platform("cuda", "cuda:0", "H200", (9, 0))
    assert "Blackwell's" in bw.blackwell_unavailable_reason(spec, hopper, "w4a4") and "SM90" in \
        bw.blackwell_unavailable_reason(spec, hopper, "w4a4")
    blackwell = Platform("cuda", "cuda:0", "B200", (10, 0))
    assert "W4A16" in bw.blackwell_unavailable_reason(spec, blackwell, "w4a16")
    monkeypatch.setenv(bw.ENV, "trtllm")
    assert "shuffled" in bw.blackwell_unavailable_reason(spec, blackwell, "w4a4")
    (method,) = bw.offer(CONFIG, spec, Platform("cpu", "cpu", "x86"))
    assert method.name == "nvfp4-blackwell-fp4-gemm" and "Blackwell" in method.unavailable_reason


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() not in bw.BLACKWELL,
                    reason="needs a Blackwell GPU (SM100/103/110/120/121) for FP4 tensor cores")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_real_fp4_gemm_on_blackwell(backend, monkeypatch):
    monkeypatch.setenv(bw.ENV, backend)
    layer = _layer(256, 512).cuda()
    method = bw.Nvfp4BlackwellMethod(CONFIG, LayerSpec("l", 512, 256, True, torch.bfloat16))
    method.process_weights_after_loading(layer)
    x = torch.randn(64, 512, device="cuda")
    got = method.apply(layer, x.bfloat16(), layer.bias.bfloat16()).float()
    expected = layer(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999
