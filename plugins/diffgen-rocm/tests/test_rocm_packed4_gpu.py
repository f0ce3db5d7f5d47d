"""MXFP4 on an NVIDIA GPU through diffgen-cuda's packed4 kernel (weight-only), against the reference
definition. Marked ``cuda``; skipped without a CUDA GPU that packed4 can run on."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from diffgen.linear import QuantLinear
from diffgen.loader import load_transformer
from diffgen.platform import Platform
from diffgen.quant import LayerSpec, QuantRequest
from diffgen.tiny.transformers import tiny_transformer_inputs
from diffgen_rocm import mxfp4
from diffgen_rocm.mxfp4_cuda import Mxfp4Packed4Method, packed4_unavailable_reason

import mx_definition as mx
from wide_models import wide_transformer

FIXTURES = Path(__file__).parent / "fixtures"


def _gpu_reason() -> str | None:
    if not torch.cuda.is_available() or torch.version.hip:
        return "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    platform = Platform("cuda", "cuda:0", torch.cuda.get_device_name(), (major, minor))
    return packed4_unavailable_reason(LayerSpec("probe", 4096, 4096, False, torch.bfloat16), platform)


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))]


def _layer(method_cls, weight, bias, device="cuda"):
    config = mxfp4.online_claim(type("S", (), {"tensors": {}, "config": {}})(), QuantRequest("mxfp4")).config
    spec = LayerSpec("blocks.0.ff", weight.shape[1], weight.shape[0], True, torch.bfloat16)
    with torch.device(device):
        layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.bfloat16)
    layer.weight.data = weight.to(device, torch.bfloat16)
    layer.bias.data = bias.to(device, torch.bfloat16)
    layer.method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("n, k", [(3072, 3072), (12288, 3072), (3072, 12288), (320, 80)])
def test_packed4_equals_the_dequantized_weight_times_x(n, k):
    torch.manual_seed(0)
    weight, bias = torch.randn(n, k) * 0.02, torch.randn(n)
    layer = _layer(Mxfp4Packed4Method, weight, bias)
    x = torch.randn(2, 300, k, device="cuda", dtype=torch.bfloat16)
    got = layer(x).float()
    w = mx.decode_mxfp4(layer.weight.cpu(), layer.weight_scale.cpu(), k).cuda()  # the definition, fp32
    expected = x.float() @ w.T + bias.cuda().bfloat16().float()
    # packed4 writes W exactly in bf16 (E2M1 x 2^e is exact), cuBLAS accumulates in fp32 and
    # rounds the output to bf16: within a few bf16 ulps of the output's scale.
    assert torch.allclose(got, expected, rtol=2 ** -6, atol=2 ** -6 * expected.abs().max().item())
    # and near the W4A4 reference, whose activations are also rounded to MXFP4
    reference = _layer(mxfp4.Mxfp4ReferenceMethod, weight, bias)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), reference(x).float().flatten(), dim=0).item()
    assert cos >= 0.99


def test_packed4_compiles_to_the_same_output():
    torch.manual_seed(1)
    layer = _layer(Mxfp4Packed4Method, torch.randn(1024, 1024) * 0.02, torch.randn(1024))
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer)(x)
    assert torch.allclose(compiled.float(), eager.float(), rtol=2 ** -7, atol=1e-3)


def test_online_and_quark_loads_pick_packed4_and_match_the_reference():
    model = wide_transformer("flux1", heads=2).bfloat16()
    source = Path(tempfile.mkdtemp()) / "t"
    model.save_pretrained(source, safe_serialization=True)
    for path, flags in ((source, {"quantization": "mxfp4"}), (FIXTURES / "flux1-mxfp4", {})):
        gpu = load_transformer(path, device="cuda", dtype="bf16", **flags)
        cpu = load_transformer(path, device="cpu", dtype="fp32", **flags)
        methods = {d.method.name for d in gpu.diffgen_plan.decisions if d.action == "quantize"}
        # SM89+: the FP8 tensor-core path outranks weight-only (native > weight-only)
        assert methods == {"mxfp4-packed4-w4a8" if torch.cuda.get_device_capability() >= (8, 9) else "mxfp4-packed4"}
        # the same random inputs (drawn in fp32, then cast to each model's dtype)
        cpu_inputs = tiny_transformer_inputs("flux1", cpu, seed=2)
        gpu_inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                      for k, v in tiny_transformer_inputs("flux1", gpu, seed=2).items()}
        with torch.no_grad():
            expected = cpu(**cpu_inputs, return_dict=False)[0].float()
            got = gpu(**gpu_inputs, return_dict=False)[0].float().cpu()
        # W4A8 (or W4A16) in bf16 on the GPU against the fp32 W4A4 reference on the CPU
        cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
        assert cos >= 0.995, (path, cos)
