"""The fused Triton FP8 path against the builtin PyTorch path. GPU only (SM89+ with Triton);
on the CPU only the offer's reasons are checked."""

from __future__ import annotations

import pytest
import torch

from diffgen.builtin.fp8_methods import Fp8ReferenceMethod, Fp8ScaledMMMethod
from diffgen.linear import PreparedInputMethod
from diffgen.numerics.fp8 import quantize_fp8_per_token, quantize_fp8_static
from diffgen.platform import Platform
from diffgen.quant import LayerSpec, QuantConfig
from diffgen.testing.layers import fp8_linear
from diffgen_cuda.fused import Fp8TritonMethod, offer

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU with FP8 (SM89+) and Triton")


def test_offer_reasons_on_cpu_and_old_gpus():
    config = QuantConfig.make("fp8", scheme="per-channel", params={"activation_scheme": "dynamic"})
    spec = LayerSpec("l", 64, 64, True, torch.bfloat16)
    cpu = offer(config, spec, Platform("cpu", "cpu", "x86"))
    assert cpu.kind == "native" and "CUDA" in cpu.unavailable_reason
    # The fused producers round as bf16 ops do: prepared inputs for bf16 activations only, and not
    # for the few-row inputs that keep 16-bit activations.
    assert isinstance(cpu, PreparedInputMethod)
    assert cpu.takes_prepared_input(None, None) and cpu.takes_prepared_input(None, 4096)
    assert not cpu.takes_prepared_input(None, 1)
    fp16 = LayerSpec("l", 64, 64, True, torch.float16)
    assert not offer(config, fp16, Platform("cpu", "cpu", "x86")).takes_prepared_input(None, None)
    assert offer(QuantConfig.make("fp8", scheme="block"), spec, Platform("cpu", "cpu", "x86")) is None
    assert offer(QuantConfig.make("int8wo"), spec, Platform("cpu", "cpu", "x86")) is None


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 64), (7, 3072), (300, 15360), (4, 2, 48)])
def test_kernels_bit_identical_to_pytorch(shape):
    from diffgen_cuda.kernels.fp8_quant import quant_fp8_per_token, quant_fp8_static

    torch.manual_seed(0)
    x = (torch.randn(*shape, device="cuda") * 3).bfloat16()
    x[..., 0] = 0  # rows with zeros and one all-zero row must not divide by zero
    if x.shape[0] > 1:
        x[0] = 0
    scale = torch.tensor(2.5 / 448, device="cuda")
    assert torch.equal(quant_fp8_static(x, scale, torch.float8_e4m3fn).view(torch.uint8),
                       quantize_fp8_static(x, scale).view(torch.uint8))
    q, s = quant_fp8_per_token(x, torch.float8_e4m3fn)
    q_ref, s_ref = quantize_fp8_per_token(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # with a smoothing applied on the way: the bits of x * smoothing (rounded to bf16) quantized
    smoothing = (torch.rand(shape[-1], device="cuda") * 4 + 0.25).bfloat16()
    q, s = quant_fp8_per_token(x, torch.float8_e4m3fn, smoothing)
    q_ref, s_ref = quantize_fp8_per_token(x * smoothing)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def _layers(scheme, activation, k=512, n=384):
    weight, bias = (torch.randn(n, k) * 0.05).cuda(), torch.randn(n).cuda()
    return [fp8_linear(cls, weight, scheme=scheme, activation=activation, bias=bias, input_scale=4.0 / 448)
            for cls in (Fp8ReferenceMethod, Fp8ScaledMMMethod, Fp8TritonMethod)]


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("scheme,activation", [("per-tensor", "static"), ("per-tensor", "dynamic"),
                                               ("per-channel", "dynamic"), ("per-channel", "static")])
def test_fused_method_equals_builtin_native(scheme, activation):
    reference, builtin, fused = _layers(scheme, activation)
    x = torch.randn(3, 50, 512, device="cuda").bfloat16()
    with torch.no_grad():
        # Same quantized operands and the same GEMM call: identical results.
        assert torch.equal(fused(x), builtin(x))
        y, r = fused(x).float(), reference(x).float()
    assert torch.nn.functional.cosine_similarity(y.flatten(), r.flatten(), dim=0) > 0.9999


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("scheme,activation", [("per-tensor", "static"), ("per-tensor", "dynamic"),
                                               ("per-channel", "dynamic"), ("per-channel", "static")])
@pytest.mark.parametrize("shape", [(1, 512), (1, 1, 512), (2, 1, 512), (4, 512)])
def test_few_rows_gemv_matches_the_definition(scheme, activation, shape):
    """Up to WEIGHT_ONLY_ROWS rows go to the GEMV kernel: 16-bit activations, the FP8 weight,
    fp32 accumulation; the reference computes the same in fp32, the builtin with a bf16 GEMM."""
    reference, builtin, fused = _layers(scheme, activation)
    x = torch.randn(*shape, device="cuda").bfloat16() * 3
    with torch.no_grad():
        y, r, b = fused(x), reference(x), builtin(x)
    assert y.shape == b.shape == (*shape[:-1], 384) and y.dtype == torch.bfloat16
    # Roundings of (almost) the same fp32 sums: within a couple of bf16 ulps.
    torch.testing.assert_close(y.float(), r.float(), rtol=2 ** -7, atol=2 ** -7 * r.abs().max().item())
    torch.testing.assert_close(y.float(), b.float(), rtol=2 ** -6, atol=2 ** -6 * b.abs().max().item())


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k,per_channel,bias", [(1, 100, 200, True, True), (4, 384, 512, False, False),
                                                      (3, 18432, 3072, True, True)])
def test_gemv_kernel_against_fp32(dtype, rows, n, k, per_channel, bias):
    """The kernel alone, edges included (N and K not multiples of the blocks, fp16), against
    x @ (W * s_w)^T + b in fp32, eager and through its operator compiled."""
    from diffgen_cuda.kernels.fp8_gemv import MAX_ROWS, fp8_gemv, fp8_gemv_op

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(n if per_channel else (), device="cuda", generator=g) / 100
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    y = fp8_gemv(x, w, ws, b)
    expected = (x.float() @ w.float().t()) * ws + (0 if b is None else b.float())
    assert y.dtype == dtype and y.shape == (rows, n)
    torch.testing.assert_close(y.float(), expected, rtol=2 ** -7, atol=2 ** -7 * expected.abs().max().item())
    compiled = torch.compile(lambda *a: fp8_gemv_op(*a), fullgraph=True)(x, w, ws, b)
    torch.testing.assert_close(compiled.float(), expected, rtol=2 ** -7, atol=2 ** -7 * expected.abs().max().item())
    with pytest.raises(ValueError, match="at most"):
        fp8_gemv(x.new_zeros(MAX_ROWS + 1, k), w, ws, b)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("rows", [64, 1])
def test_fused_method_compiles_and_replays_in_cuda_graphs(rows):
    _, _, fused = _layers("per-channel", "dynamic")
    x = torch.randn(rows, 512, device="cuda").bfloat16()
    with torch.no_grad():
        eager = fused(x)
        compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            out = compiled(x)
    assert torch.allclose(out.float(), eager.float(), rtol=2 ** -7, atol=1e-2)
    # Eager calls into the custom ops also capture into a CUDA graph (no host sync inside).
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        fused(static_x)
        with torch.cuda.graph(graph):
            static_out = fused(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


@gpu
@pytest.mark.cuda
def test_wide_rows_use_the_kernel_under_compile():
    """Compiled, per-token rows wider than WIDE_ROW go to the Triton kernel's operator: the same
    bits as the eager kernel and the PyTorch definition, with no graph break."""
    from diffgen_cuda.fused import WIDE_ROW

    k, n = 12288, 3072  # FLUX's ff.net.2 (cuBLASLt refused a row-wise 74 x 9216 x 256 GEMM on the H100)
    assert k > WIDE_ROW
    reference, _, fused = _layers("per-channel", "dynamic", k=k, n=n)
    assert fused.method.wide_row_op is not None
    torch.manual_seed(1)
    x = (torch.randn(2, 64, k, device="cuda") * 3).bfloat16()
    calls = []
    real = fused.method.wide_row_op

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    q_ref, s_ref = quantize_fp8_per_token(x.reshape(-1, k))
    q, s = torch.compile(lambda t: real(t, torch.float8_e4m3fn), fullgraph=True)(x.reshape(-1, k))
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    with torch.no_grad():
        eager = fused(x)
        fused.method.wide_row_op = counting
        compiled = torch.compile(fused, fullgraph=True)(x)
    assert calls, "the wide-row operator was not traced"
    assert torch.equal(compiled, eager)
    y, r = compiled.float(), reference(x).float()
    assert torch.nn.functional.cosine_similarity(y.flatten(), r.flatten(), dim=0) > 0.9999


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("scheme,activation", [("per-tensor", "static"), ("per-channel", "dynamic")])
@pytest.mark.parametrize("rows", [1, 5])
def test_a_nan_activation_makes_its_row_nan(scheme, activation, rows):
    """As on the PyTorch path; Triton's default min/max would have clamped the NaN to a finite value.
    Rows without one stay finite. rows=1 goes to the GEMV kernel."""
    _, builtin, fused = _layers(scheme, activation)
    x = torch.randn(rows, 512, device="cuda").bfloat16()
    x[0, 3] = float("nan")
    with torch.no_grad():
        y, b = fused(x), builtin(x)
        (q, _), _ = fused.method.prepare_norm_modulate(fused, x[None], torch.zeros_like(x[:1]),
                                                       torch.zeros_like(x[:1]), 1e-6, False)
    assert torch.isnan(b[0]).all() and torch.isnan(y[0]).all()
    assert torch.isfinite(y[1:]).all()
    assert torch.isnan(q[0].float()).all() and not torch.isnan(q[1:].float()).any()  # LayerNorm spreads it
