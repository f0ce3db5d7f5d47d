"""attention_cudnn_fp8 (``--attention fp8-cudnn``): the argument preparation on the CPU (cuDNN's
dims and strides for diffusers' layout, the per-tensor E4M3 quantization against the format, the
reference against fp32 attention, the backend's refusals); the cuDNN calls themselves on an SM90+
GPU with the cuDNN frontend installed, skipped elsewhere with the reason."""

from __future__ import annotations

import math

import pytest
import torch

from diffgen.attention import AttentionCall, attention_backends
from diffgen.platform import Platform
from diffgen_cuda import attention_cudnn_fp8 as cf


def _platform(kind="cuda", capability=(9, 0)):
    return Platform(device_kind=kind, device="cuda:0" if kind == "cuda" else kind, device_name="test GPU",
                    capability=capability if kind == "cuda" else None)


def test_dims_and_strides_follow_the_tensor_not_a_copy():
    x = torch.empty(2, 7, 3, 16)  # diffusers' [B, L, H, D]
    assert cf.cudnn_dims_strides(x) == ((2, 3, 7, 16), (7 * 3 * 16, 16, 3 * 16, 1))
    heads_first = torch.empty(2, 3, 7, 16).transpose(1, 2)  # a [B, H, L, D] tensor seen as [B, L, H, D]
    assert cf.cudnn_dims_strides(heads_first) == ((2, 3, 7, 16), (3 * 7 * 16, 7 * 16, 16, 1))


def test_per_tensor_quantization_is_e4m3_of_the_scaled_values():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 9, 3, 64, generator=g) * 5).bfloat16().transpose(1, 2)  # strided input
    x8, descale = cf.quantize_per_tensor(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and x8.stride() == x.stride()
    assert descale.shape == (1, 1, 1, 1) and descale.dtype == torch.float32
    amax = x.float().abs().max()
    assert descale.reshape(()) == amax / 448
    codes = x8.float()
    assert codes.abs().max() == 448  # the largest magnitude lands on E4M3's largest value
    # each code is the scaled value rounded to E4M3 (3 mantissa bits): within 2^-4 relative, or
    # half of the smallest subnormal step (2^-10) near zero
    scaled = x.float() * (1 / (amax / 448))
    assert ((codes - scaled).abs() <= torch.maximum(scaled.abs() * 2 ** -4, torch.tensor(2 ** -10))).all()
    assert torch.equal(codes, scaled.clamp(-448, 448).to(torch.float8_e4m3fn).float())
    zeros8, zero_descale = cf.quantize_per_tensor(torch.zeros(1, 4, 2, 64))
    assert not zeros8.float().any() and float(zero_descale) == 1.0


def test_the_e4m3_output_scale_is_a_power_of_two_that_keeps_any_output_in_range():
    """On Hopper cuDNN writes O in E4M3: O times scale_o must stay below 448 for any attention
    output (|O| <= amax(v)), and multiplying back by 1 / scale_o must be exact in bf16."""
    for amax_v in (1e-6, 0.013, 1.0, 3.7, 448.0, 5e4):
        descale_v = torch.tensor(amax_v / 448).reshape(1, 1, 1, 1)
        scale = cf.output_scale(descale_v).reshape(())
        mantissa, _ = torch.frexp(scale)
        assert mantissa == 0.5  # a power of two
        assert 112 < amax_v * float(scale) <= 224  # the bound, with no more than a factor 2 of range given up
        assert float(scale.reciprocal().bfloat16()) * float(scale) == 1.0
    # an attention output of that magnitude round-trips through E4M3 to within its 3 mantissa bits
    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 64, 2, 64, generator=g) * 3
    o = torch.softmax(torch.randn(1, 2, 64, 64, generator=g) * 4, dim=-1) @ v.transpose(1, 2)
    _, descale_v = cf.quantize_per_tensor(v)
    scale = cf.output_scale(descale_v).reshape(())
    back = (o * scale).to(torch.float8_e4m3fn).bfloat16() * scale.reciprocal().bfloat16()
    assert ((back.float() - o).abs() <= o.abs() * 2 ** -4 + 2 ** -9 / scale).all()


@pytest.mark.parametrize("lq,lk", [(64, 64), (50, 200)])
def test_the_reference_is_close_to_fp32_attention(lq, lk):
    """Per-tensor E4M3 operands alone, as cuDNN takes them: what they cost against fp32 SDPA on
    Gaussian inputs (the GPU test bounds cuDNN against this reference and against fp32)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 4, 64, generator=g) for n in (lq, lk, lk))
    got = cf.reference_attention_cudnn_fp8(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    rel_rms = ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt()
    assert cosine > 0.998 and rel_rms < 0.06, (float(cosine), float(rel_rms))
    scale = 0.5 / math.sqrt(64)  # an explicit scale is the one used
    sharper = cf.reference_attention_cudnn_fp8(q, k, v, scale=scale)
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                                            scale=scale).transpose(1, 2)
    assert torch.nn.functional.cosine_similarity(sharper.flatten(), want.flatten(), dim=0) > 0.998


def test_the_backend_is_published_and_says_where_it_cannot_run():
    backend = attention_backends()["fp8-cudnn"]
    assert "cpu" in backend.unavailable_reason(_platform("cpu"))
    assert "SM89" in backend.unavailable_reason(_platform(capability=(8, 9)))
    reason = backend.unavailable_reason(_platform(capability=(9, 0)))
    try:
        cf._frontend()
    except Exception:  # no frontend here (the CPU machine): it says how to install it
        assert "nvidia-cudnn-frontend" in reason
    q = torch.zeros(1, 8, 2, 16, dtype=torch.bfloat16)
    assert "head dim 16" in backend.call_unsupported_reason(AttentionCall(q, q, q))
    assert "bf16 or fp16" in backend.call_unsupported_reason(AttentionCall(q.float(), q.float(), q.float()))
    # short key sequences, where it was measured slower than bf16 SDPA, fall back naming why
    short = torch.zeros(1, cf.MIN_KEYS - 1, 2, 64, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("DIFFGEN_FP8_ATTENTION_MIN_KEYS", raising=False)
        assert f"{cf.MIN_KEYS - 1} keys: below {cf.MIN_KEYS}" in backend.call_unsupported_reason(
            AttentionCall(short, short, short))
        env.setenv("DIFFGEN_FP8_ATTENTION_MIN_KEYS", str(cf.MIN_KEYS - 1))  # the same rule as --attention fp8's
        assert "keys" not in (backend.call_unsupported_reason(AttentionCall(short, short, short)) or "")
    long_keys = torch.zeros(1, cf.MIN_KEYS, 2, 64, dtype=torch.bfloat16)
    if reason is not None:  # a call cuDNN cannot build a graph for falls back, naming why
        assert f"cuDNN built no FP8 attention graph for q (1, {cf.MIN_KEYS}, 2, 64)" in backend.call_unsupported_reason(
            AttentionCall(long_keys, long_keys, long_keys))


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from diffgen.platform import resolve

    return cf.unavailable_reason(resolve("cuda")[0])


needs_cudnn_fp8 = pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))


def _inputs(b, lq, lk, h, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for n in (lq, lk, lk))
    return q, k, v


def _fp32_attention(q, k, v, scale=None):
    out = torch.nn.functional.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)), scale=scale)
    return out.transpose(1, 2)


@needs_cudnn_fp8
@pytest.mark.cuda
@pytest.mark.parametrize("b,lq,lk,h,d", [(1, 300, 300, 3, 128), (2, 257, 700, 4, 64), (1, 4608, 4608, 2, 128)])
def test_cudnn_fp8_attention_against_fp32_and_the_reference(b, lq, lk, h, d):
    q, k, v = _inputs(b, lq, lk, h, d)
    refused = cf.graph_reason(q, k, v)
    if refused is not None:  # the backend hands such calls to SDPA; record which layouts cuDNN refuses
        pytest.skip(f"cuDNN refuses this layout: {refused}")
    with torch.no_grad():
        got = cf.attention_cudnn_fp8(q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    want, ref = _fp32_attention(q, k, v), cf.reference_attention_cudnn_fp8(q, k, v)

    def compare(a, b_):
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b_.float().flatten(), dim=0)
        rel = ((a.float() - b_.float()).pow(2).mean() / b_.float().pow(2).mean()).sqrt()
        return float(cos), float(rel)

    cos, rel = compare(got, want)
    assert cos > 0.998 and rel < 0.07, (cos, rel)  # per-tensor E4M3 q, k, v and P
    cos_ref, _ = compare(got, ref)
    assert cos_ref > 0.999, cos_ref  # beyond the operands, only P's rounding and the sum order


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton)")
def test_the_gpu_quantization_pass_gives_the_cpu_codes():
    """The Triton pass (contiguous, and a [B, H, L, D] tensor seen as [B, L, H, D]) gives the codes
    and descale of the PyTorch ops, bit for bit."""
    x = (torch.randn(2, 4, 300, 64) * 3).bfloat16()
    for view in (x.transpose(1, 2).contiguous(), x.transpose(1, 2)):
        want8, want_descale = cf.quantize_per_tensor(view)
        got8, got_descale = cf.quantize_per_tensor(view.cuda())
        assert got8.stride() == view.stride() and torch.equal(got_descale.cpu(), want_descale)
        assert torch.equal(got8.cpu().view(torch.uint8), want8.view(torch.uint8))


@needs_cudnn_fp8
@pytest.mark.cuda
def test_strided_inputs_and_the_compiled_operator_give_the_eager_bits():
    q, k, v = _inputs(1, 200, 200, 4, 128, seed=3)
    with torch.no_grad():
        eager = cf.attention_cudnn_fp8(q, k, v)
        heads_first = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # same values, strided
        assert torch.equal(cf.attention_cudnn_fp8(*heads_first), eager)
        compiled = torch.compile(lambda a, b_, c: cf.attention_cudnn_fp8(a, b_, c), fullgraph=True)
        try:
            assert torch.equal(compiled(q, k, v), eager)
        finally:
            torch._dynamo.reset()
