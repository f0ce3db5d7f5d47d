"""The W4A16 kernel (kernels/w4_gemm.py) against the formats' definitions, on a CUDA GPU (SM89+ with
Triton); skipped elsewhere with the reason. Its CPU side (the offer and why it cannot run) is in
test_nvfp4.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffgen.numerics.e2m1 import pack_e2m1
from diffgen.numerics.nvfp4 import dequantize_nvfp4, quantize_nvfp4

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU of SM89+ with Triton"),
]


def _nvfp4(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed, scale, global_scale = quantize_nvfp4(torch.randn(n, k, generator=g))
    return packed.cuda(), scale.cuda(), global_scale.cuda()


def _close(got, expected):
    # bf16 output: one rounding of a sum the kernel accumulates in fp32 (in another order)
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < 8e-3, float(err)


@pytest.mark.parametrize("m, n, k", [(1, 64, 64), (3, 3072, 3072), (77, 200, 40), (4608, 3072, 3072),
                                     (512, 18432, 3072), (300, 3072, 15360)])
@pytest.mark.parametrize("bias", [False, True])
def test_nvfp4_w4a16_is_the_dequantized_matmul(m, n, k, bias):
    from diffgen_cuda.kernels.w4_gemm import w4a16_gemm

    packed, scale, global_scale = _nvfp4(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    w = dequantize_nvfp4(packed, scale, global_scale, k=k)
    expected = F.linear(x.float(), w, None if b is None else b.float())
    _close(w4a16_gemm(x, packed, scale, global_scale, b), expected)


@pytest.mark.parametrize("group, scales", [(32, "e8m0"), (64, "fp16")])
def test_int4_codes_and_other_scales(group, scales):
    from diffgen_cuda.kernels.w4_gemm import E8M0, FLOAT, INT4, w4a16_gemm

    n, k = 256, 512
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    signed = codes.int() - (codes.int() >= 8).int() * 16
    if scales == "e8m0":
        exponents = torch.randint(120, 130, (n, k // group), generator=g, dtype=torch.uint8)
        scale, values = exponents, torch.pow(2.0, exponents.float() - 127)
    else:
        values = torch.rand(n, k // group, generator=g) + 0.1
        scale = values.half()
        values = scale.float()
    w = signed.float() * values.repeat_interleave(group, dim=1)
    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    got = w4a16_gemm(x, pack_e2m1(codes).cuda(), scale.cuda(), torch.ones((), device="cuda"), None,
                     codes=INT4, scales=E8M0 if scales == "e8m0" else FLOAT, group=group)
    _close(got, x.float() @ w.cuda().T)


def test_compiled_operator_gives_the_eager_bits():
    from diffgen_cuda.kernels.w4_gemm import E2M1, E4M3, w4a16_gemm, w4a16_gemm_op

    if w4a16_gemm_op is None:
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    packed, scale, global_scale = _nvfp4(512, 1024)
    x = torch.randn(100, 1024, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda x: w4a16_gemm_op(x, packed, scale, global_scale, None, E2M1, E4M3, 16))
    assert torch.equal(compiled(x), w4a16_gemm(x, packed, scale, global_scale, None))


def test_real_export_runs_the_kernel_on_the_gpu():
    from modelopt_fixtures import cosine, export_dir, run

    import diffgen
    from diffgen.tiny.transformers import tiny_transformer_inputs

    model = diffgen.load_transformer(export_dir("flux1-nvfp4"), device="cuda", dtype=torch.bfloat16)
    methods = {d.method.name for d in model.diffgen_plan.decisions if d.method}
    assert "nvfp4-triton-w4a8" in methods and methods <= {"nvfp4-triton-w4a8", "nvfp4-triton-dequant"}
    reference = diffgen.load_transformer(export_dir("flux1-nvfp4"), device="cuda", dtype=torch.bfloat16,
                                         quant_backend="nvfp4-reference")
    inputs = {k: v.cuda() if torch.is_tensor(v) else v
              for k, v in tiny_transformer_inputs("flux1", reference, seed=1).items()}
    # FP8 activations and an FP8 weight grid against NVFP4 activations and weights: close, not equal.
    assert cosine(run(model, inputs), run(reference, inputs)) > 0.99


@pytest.mark.parametrize("n, k", [(300, 200), (3072, 3072), (77, 1000), (21504, 3072)])
@pytest.mark.parametrize("kind", ["tiles", "pairs"])
def test_dequantize_pass_is_the_definition(n, k, kind, monkeypatch):
    """NVFP4 at FLUX.1-like shapes (and ones that end mid-tile): the format's products, (code * block
    scale) * global, in fp32 and rounded once to bf16, exactly as diffgen.numerics computes them."""
    from diffgen_cuda.kernels import w4_gemm
    from diffgen_cuda.kernels.w4_gemm import w4_dequantize, w4_dequantize_op

    packed, scale, global_scale = _nvfp4(n, k)
    expected = dequantize_nvfp4(packed, scale, global_scale, k=k)
    assert torch.equal(w4_dequantize(packed, scale, global_scale, k, torch.float32, kind=kind), expected)
    got = w4_dequantize(packed, scale, global_scale, k, torch.bfloat16, kind=kind)
    assert torch.equal(got, expected.to(torch.bfloat16))
    if w4_dequantize_op is not None:  # the operator torch.compile places, with this pass as the default
        monkeypatch.setattr(w4_gemm, "DEQUANT_PASS", kind)
        compiled = torch.compile(lambda: w4_dequantize_op(packed, scale, global_scale, k, torch.bfloat16, None))
        assert torch.equal(compiled(), got)


@pytest.mark.parametrize("n, k", [(512, 1024), (3072, 3072), (19, 80)])
@pytest.mark.parametrize("kind", ["tiles", "pairs"])
def test_fp8_dequantize_pass_is_the_w4a8_weight(n, k, kind):
    """What nvfp4-triton-w4a8 multiplies: per row, code * block scale * (global / row) rounded once to
    E4M3, written bit for bit (torch rounds to nearest even as the GPU's cvt does)."""
    from diffgen_cuda import packed4
    from diffgen_cuda.kernels.w4_gemm import w4_dequantize

    packed, scale, global_scale = _nvfp4(n, k, seed=5)
    global_rows = global_scale.reshape(1).expand(n).contiguous()
    scale_b, factor, one = packed4.row_scales(scale, global_rows, codes=packed4.E2M1, scales=packed4.E4M3)
    w = dequantize_nvfp4(packed, scale, torch.ones((), device="cuda"), k=k)
    expected = (w * factor[:, None]).to(torch.float8_e4m3fn)
    got = w4_dequantize(packed, scale, one, k, torch.float8_e4m3fn, factor, kind=kind)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    # and the grid holds the weight: within half an E4M3 step (2^-4 relative; 2^-10 of the row scale
    # among the subnormals) of the definition
    weight, rows = dequantize_nvfp4(packed, scale, global_scale, k=k), scale_b.reshape(-1, 1)
    assert ((got.float() * rows - weight).abs() <= 2 ** -4 * weight.abs() + 2 ** -10 * rows).all()


@pytest.mark.parametrize("m", [3, 300])
def test_w4a8_stays_within_the_gate_of_the_definition(m):
    from diffgen.linear import QuantLinear
    from diffgen.quant import LayerSpec, QuantConfig
    from diffgen_cuda import nvfp4, nvfp4_w4a8

    n, k = 512, 1024
    config = QuantConfig.make("nvfp4", scheme="w4a4")
    spec = LayerSpec("l", k, n, True, torch.bfloat16)
    packed, scale, global_scale = _nvfp4(n, k, seed=3)
    layers = {}
    for cls in (nvfp4.Nvfp4ReferenceMethod, nvfp4_w4a8.Nvfp4TritonW4A8Method):
        with torch.device("cuda"):
            layer = QuantLinear(spec, cls(config, spec), dtype=torch.bfloat16)
        layer.weight.data, layer.weight_scale.data, layer.weight_scale_2.data = packed, scale, global_scale
        layer.input_scale.data = torch.tensor(4.0 / (6 * 448), device="cuda")
        layer.bias.data = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        layer.method.process_weights_after_loading(layer)
        layers[cls.name] = layer
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got, expected = layers["nvfp4-triton-w4a8"](x).float(), layers["nvfp4-reference"](x).float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99
