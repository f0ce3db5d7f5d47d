"""msmodelslim-fp8's argument preparation on the CPU: the dequantized linear it puts on the FP8 grid
equals the scheme's definition (schemes.reference_linear) wherever the scheme's activation rounding
is exact, i.e. for inputs already on the activation grid. The FP8 GEMM itself runs in the
cuda-marked test_ascend_generate.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffgen.platform import Platform
from diffgen.quant import LayerSpec
from diffgen_ascend import fp8, schemes


def _layer(scheme, n=24, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    qmax = 7 if scheme == "W4A4_DYNAMIC" else 127
    weight = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=g).to(torch.int8)
    if scheme == "W8A8":
        return SimpleNamespace(weight=weight, in_features=k, quant_bias=torch.randint(-500, 500, (n,), generator=g).int(),
                               input_scale=torch.tensor([0.02]), input_offset=torch.tensor([3.0]),
                               deq_scale=torch.rand(n, generator=g) * 1e-3 + 1e-4)
    return SimpleNamespace(weight=weight, in_features=k, weight_scale=torch.rand(n, 1, generator=g) * 0.01 + 1e-3,
                           weight_offset=torch.zeros(n, 1))


@pytest.mark.parametrize("scheme", ["W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC"])
def test_dequantized_linear_is_the_definition_on_the_activation_grid(scheme):
    layer = _layer(scheme)
    g = torch.Generator().manual_seed(1)
    k = layer.in_features
    if scheme == "W8A8":  # x = (xq - offset) * scale: the static quantization gives xq back exactly
        xq = torch.randint(-128, 128, (5, k), generator=g).float()
        x = (xq - 3.0) * 0.02
    else:  # rows whose largest |value| is qmax times the row scale, every value a multiple of it
        qmax = schemes.QMAX[scheme]
        q = torch.randint(-qmax, qmax + 1, (5, k), generator=g).float()
        q[:, 0] = qmax
        x = q * (torch.rand(5, 1, generator=g) + 0.5)
    bias = None if scheme == "W8A8" else torch.randn(layer.weight.shape[0], generator=g)
    expected = schemes.reference_linear(scheme, layer, x.double(), bias, {}).double()
    m, row_scale, folded = fp8.dequantized_linear(scheme, layer)
    w = m.double() * row_scale.double()[:, None]
    got = x.double() @ w.T + (folded.double() if folded is not None else bias.double())
    # fp32 scales and sums on both sides: agreement to fp32 rounding of the output's scale
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_int4_weights_are_exact_on_the_fp8_grid():
    m, _, _ = fp8.dequantized_linear("W4A4_DYNAMIC", _layer("W4A4_DYNAMIC"))
    assert torch.equal(m.to(torch.float8_e4m3fn).float(), m)  # every int4 value is an E4M3 value
    m8, _, _ = fp8.dequantized_linear("W8A8_DYNAMIC", _layer("W8A8_DYNAMIC"))
    err = (m8.to(torch.float8_e4m3fn).float() - m8).abs() / m8.abs().clamp(min=1)
    assert err.max() <= 2 ** -4  # int8 values: E4M3's 3 mantissa bits, half an ulp at most


def test_offered_on_fp8_gpus_only_with_the_reason():
    layer = LayerSpec("blocks.0.ff", 64, 32, True, torch.bfloat16)
    assert "NVIDIA" in fp8.fp8_unavailable_reason(layer, Platform("cpu", "cpu", "x86"))
    assert "SM89" in fp8.fp8_unavailable_reason(layer, Platform("cuda", "cuda:0", "A100", (8, 0)))
    assert fp8.fp8_unavailable_reason(layer, Platform("cuda", "cuda:0", "H200", (9, 0))) is None
    odd = LayerSpec("blocks.0.ff", 72, 40, True, torch.bfloat16)
    assert "multiples of 16" in fp8.fp8_unavailable_reason(odd, Platform("cuda", "cuda:0", "H200", (9, 0)))
