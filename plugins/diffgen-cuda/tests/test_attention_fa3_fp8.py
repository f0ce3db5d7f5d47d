"""attention_fa3_fp8 (``--attention fp8-fa3``): the argument preparation on the CPU (per-head E4M3
codes and descales against the format, K's smoothing, the layout PyTorch's operator documents), the
call's contract against a stand-in for that operator, the backend's refusals; the FA3 call itself on
a Hopper GPU with FlashAttention-3 installed, skipped elsewhere with the reason."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from diffgen.attention import AttentionCall, attention_backends
from diffgen.platform import Platform
from diffgen_cuda import attention_fa3_fp8 as fa3
from diffgen_cuda.fused import kernels

E4M3 = torch.float8_e4m3fn


def _platform(kind="cuda", capability=(9, 0)):
    return Platform(device_kind=kind, device="cuda:0" if kind == "cuda" else kind, device_name="test GPU",
                    capability=capability if kind == "cuda" else None)


def _fp32_attention(q, k, v, scale=None):
    out = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)), scale=scale)
    return out.transpose(1, 2)


def _compare(a, b):
    a, b = a.float().flatten(), b.float().flatten()
    return float(F.cosine_similarity(a, b, dim=0)), float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())


def test_per_head_codes_and_descales_are_the_format():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 9, 3, 64, generator=g) * torch.tensor([0.1, 5.0, 300.0])[:, None]).bfloat16()
    x[1, :, 2] = 0  # an all-zero head
    x8, descale = fa3.quantize_per_head(x)
    assert x8.dtype == E4M3 and x8.shape == x.shape and descale.shape == (2, 3) and descale.dtype == torch.float32
    for b in range(2):
        for h in range(3):
            head = x[b, :, h].float()
            amax = head.abs().max()
            if amax == 0:
                assert descale[b, h] == 1 and not x8[b, :, h].float().any()
                continue
            assert descale[b, h] == amax * (1 / 448)
            codes = x8[b, :, h].float()
            assert codes.abs().max() == 448  # each head's largest magnitude lands on E4M3's largest value
            assert torch.equal(codes, (head * (1 / descale[b, h])).clamp(-448, 448).to(E4M3).float())


def test_k_is_quantized_less_its_mean_over_tokens():
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(1, 50, 2, 64, generator=g) + 20.0).bfloat16()  # a large common offset
    k8, descale = fa3.quantize_per_head(k, smooth=True)
    centred = k.float() - k.float().mean(dim=1, keepdim=True)
    assert torch.equal(descale, centred.abs().amax(dim=(1, 3)) * (1 / 448))
    want = (centred * descale.reciprocal()[:, None, :, None]).clamp(-448, 448).to(E4M3)
    assert torch.equal(k8.float(), want.float())


def test_fa3_gets_the_codes_in_diffusers_layout():
    q, k, v = (torch.randn(2, n, 4, 64).bfloat16() for n in (30, 70, 70))
    args = fa3.prepare(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        t = args[name]
        assert t.dtype == E4M3 and t.shape == x.shape and t.is_contiguous()  # [B, L, H, D], FA3's layout
    for name in ("q_descale", "k_descale", "v_descale"):
        assert args[name].shape == (2, 4) and args[name].dtype == torch.float32  # (batch, kv heads), per FA3


@pytest.mark.parametrize("lq,lk,offset", [(64, 64, 0.0), (50, 200, 0.0), (64, 128, 30.0)])
def test_the_reference_is_close_to_fp32_attention(lq, lk, offset):
    """Per-head E4M3 operands alone: what they cost against fp32 SDPA on Gaussian inputs, also with a
    large common offset in K, which the smoothing takes out (the GPU test bounds FA3 against this)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 4, 64, generator=g) for n in (lq, lk, lk))
    k = k + offset
    cos, rel = _compare(fa3.reference_attention_fa3_fp8(q, k, v), _fp32_attention(q, k, v))
    assert cos > 0.998 and rel < 0.06, (cos, rel)
    if offset:  # without the smoothing the same offset costs far more: the check above can fail
        k8, dk = fa3.quantize_per_head(k)
        deq = [x8.float() * d[:, None, :, None] for x8, d in (fa3.quantize_per_head(q), (k8, dk), fa3.quantize_per_head(v))]
        _, unsmoothed = _compare(_fp32_attention(*deq), _fp32_attention(q, k, v))
        assert unsmoothed > 2 * rel, (unsmoothed, rel)


@pytest.fixture
def activations(monkeypatch) -> list:
    """FA3 not yet activated in this process; the activations asked for from now on, recorded."""
    asked = []
    monkeypatch.setattr(fa3, "_ACTIVE", [])
    monkeypatch.setattr("torch.nn.attention.activate_flash_attention_impl", asked.append)
    return asked


def test_the_call_hands_fa3_what_it_documents(monkeypatch, activations):
    """With a stand-in for FA3's ``flash_attn_func`` that checks its documented FP8 contract (E4M3
    [B, L, H, D]; fp32 (B, H) descales; bf16 [B, Lq, H, D] out) and computes FP8 attention by its
    definition, the backend's output is fp32 attention to within FP8's error, returned as it came
    (no copy), and nothing activates FA3 as PyTorch's flash attention."""
    calls = []

    def operator(q, k, v, softmax_scale, causal, q_descale, k_descale, v_descale):
        assert not causal and q.dtype == k.dtype == v.dtype == E4M3
        b, lq, h, d = q.shape
        assert k.shape[0] == b and k.shape[2:] == (h, d) and v.shape == k.shape
        for descale in (q_descale, k_descale, v_descale):
            assert descale.shape == (b, h) and descale.dtype == torch.float32
        deq = [x.float().transpose(1, 2) * s[:, :, None, None]
               for x, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
        calls.append(softmax_scale)
        return F.scaled_dot_product_attention(*deq, scale=softmax_scale).transpose(1, 2).contiguous().bfloat16()

    monkeypatch.setattr(fa3, "_operator", lambda: operator)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 3, 128, generator=g).bfloat16() for n in (40, 90, 90))
    backend = attention_backends()["fp8-fa3"]
    got = backend.attention(AttentionCall(q, k, v))
    assert got.shape == q.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
    cos, rel = _compare(got, _fp32_attention(q, k, v))
    assert cos > 0.998 and rel < 0.06, (cos, rel)
    backend.attention(AttentionCall(q, k, v, scale=0.05))
    assert calls == [128 ** -0.5, 0.05] and activations == []
    # compiled, the call goes through an opaque operator to the same eager code: the same bits
    compiled = torch.compile(lambda a, b, c: fa3.attention_fa3_fp8(a, b, c), backend="aot_eager", fullgraph=True)
    try:
        assert torch.equal(compiled(q, k, v), got) and len(calls) == 3
    finally:
        torch._dynamo.reset()


def test_the_backend_is_published_and_says_where_it_cannot_run():
    backend = attention_backends()["fp8-fa3"]
    assert "cpu" in backend.unavailable_reason(_platform("cpu"))
    assert "SM89" in backend.unavailable_reason(_platform(capability=(8, 9)))
    assert "SM100" in backend.unavailable_reason(_platform(capability=(10, 0)))
    reason = backend.unavailable_reason(_platform(capability=(9, 0)))
    if importlib.util.find_spec("flash_attn_interface") is None:  # not here: it names the module and how to build it
        assert "flash_attn_interface" in reason and "hopper" in reason
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    assert "bf16" in backend.call_unsupported_reason(AttentionCall(q.half(), q.half(), q.half()))
    odd = torch.zeros(1, 8, 2, 96, dtype=torch.bfloat16)
    assert "head dim 96" in backend.call_unsupported_reason(AttentionCall(odd, odd, odd))
    with pytest.MonkeyPatch.context() as env:
        env.delenv("DIFFGEN_FP8_ATTENTION_MIN_KEYS", raising=False)
        assert f"8 keys: below {fa3.MIN_KEYS}" in backend.call_unsupported_reason(AttentionCall(q, q, q))
        long_keys = torch.zeros(1, fa3.MIN_KEYS, 2, 64, dtype=torch.bfloat16)
        assert backend.call_unsupported_reason(AttentionCall(q, long_keys, long_keys)) is None
        env.setenv("DIFFGEN_FP8_ATTENTION_MIN_KEYS", "0")  # the same rule as the other FP8 backends'
        assert backend.call_unsupported_reason(AttentionCall(q, q, q)) is None
    with pytest.raises(ValueError, match="attention_fa3_fp8: .*bf16"):
        fa3.attention_fa3_fp8(q.float(), q.float(), q.float())


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from diffgen.platform import resolve

    return fa3.unavailable_reason(resolve("cuda")[0])


def test_the_bf16_backend_runs_flash_sdpa_after_activating_fa3(monkeypatch, activations):
    """``fa3``: FA3 activated once, then PyTorch's flash SDPA on [B, H, L, D] views (a stand-in here
    that checks the layout and computes fp32 attention), the output handed back as [B, L, H, D]."""
    calls = []

    def flash(q, k, v, sm_scale):
        assert q.dtype == torch.bfloat16 and q.shape[1] == k.shape[1] == 3  # heads first
        calls.append(sm_scale)
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=sm_scale).bfloat16()

    monkeypatch.setattr(fa3, "_flash_sdpa", flash)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 3, 64, generator=g).bfloat16() for n in (40, 90, 90))
    backend = attention_backends()["fa3"]
    got = backend.attention(AttentionCall(q, k, v))
    assert got.shape == q.shape and got.is_contiguous() and got.dtype == torch.bfloat16
    assert torch.equal(got, _fp32_attention(q, k, v).bfloat16())
    backend.attention(AttentionCall(q, k, v, scale=0.1))
    assert calls == [64 ** -0.5, 0.1] and activations == ["FA3"]
    with pytest.raises(ValueError, match="attention_fa3: .*bf16"):
        fa3.attention_fa3(q.float(), k.float(), v.float())


def test_the_bf16_backend_says_where_it_cannot_run():
    backend = attention_backends()["fa3"]
    assert "bf16 attention runs on NVIDIA GPUs" in backend.unavailable_reason(_platform("cpu"))
    reason = backend.unavailable_reason(_platform(capability=(8, 9)))
    assert "SM89" in reason and "fp8-cudnn" not in reason
    if importlib.util.find_spec("flash_attn_interface") is None:
        assert "flash_attn_interface" in backend.unavailable_reason(_platform(capability=(9, 0)))
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("DIFFGEN_FP8_ATTENTION_MIN_KEYS", raising=False)
        assert "FlashAttention-3's bf16 attention" in backend.call_unsupported_reason(AttentionCall(q, q, q))
        long_keys = torch.zeros(1, fa3.MIN_KEYS, 2, 64, dtype=torch.bfloat16)
        assert backend.call_unsupported_reason(AttentionCall(q, long_keys, long_keys)) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton)")
@pytest.mark.parametrize("d", [64, 128])
def test_the_gpu_per_head_passes_give_the_pytorch_codes(d):
    """The Triton amax (or mean and amax) and quantization passes give the descales and codes of the
    same math in PyTorch ops on the GPU, bit for bit: contiguous and [B, H, L, D] inputs, a token tail, an all-zero
    head, outlier channels, with and without the smoothing."""
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(2, 1000, 3, d, device="cuda", generator=g) * torch.tensor([0.01, 3.0, 200.0], device="cuda")[:, None]
    x[..., :4] += 40.0  # a shared offset in a few channels, as DiT keys have
    x[1, :, 1] = 0
    x = x.bfloat16()
    quant = kernels().quant
    for view in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
        # the one-pass mean sums in another order than PyTorch's: near it, and the codes follow it exactly
        mean, amax = quant.head_stats(view)
        torch.testing.assert_close(mean, view.mean(dim=1, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        assert torch.equal(amax, (view.float() - mean[:, None]).abs().amax(dim=(1, 3)))
        for smooth in (False, True):
            got8, got_descale = fa3.quantize_per_head(view, smooth=smooth)
            xf = view.float() - mean[:, None] if smooth else view.float()
            amax = xf.abs().amax(dim=(1, 3))
            want_descale = torch.where(amax > 0, amax * (1 / 448), torch.ones_like(amax))
            want8 = (xf * want_descale.reciprocal()[:, None, :, None]).clamp(-448, 448).to(E4M3)
            assert torch.equal(got_descale, want_descale), smooth
            assert got8.is_contiguous() and torch.equal(got8.view(torch.uint8), want8.view(torch.uint8)), smooth


@pytest.mark.cuda
@pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))
@pytest.mark.parametrize("b,lq,lk,h,d", [(1, 300, 300, 3, 128), (2, 257, 700, 4, 64), (1, 4608, 4608, 2, 128)])
def test_fa3_fp8_attention_against_fp32_and_the_reference(b, lq, lk, h, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for n in (lq, lk, lk))
    with torch.no_grad():
        got = fa3.attention_fa3_fp8(q, k, v)
        compiled = torch.compile(lambda a, b_, c: fa3.attention_fa3_fp8(a, b_, c), fullgraph=True)
        try:
            assert torch.equal(compiled(q, k, v), got)  # the opaque operator runs the eager code
        finally:
            torch._dynamo.reset()
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    cos, rel = _compare(got, _fp32_attention(q, k, v))
    assert cos > 0.998 and rel < 0.07, (cos, rel)  # per-head E4M3 q, k, v and P
    cos_ref, _ = _compare(got, fa3.reference_attention_fa3_fp8(q, k, v))
    assert cos_ref > 0.999, cos_ref  # beyond the operands, only P's rounding and the sum order


@pytest.mark.cuda
@pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))
def test_fa3_bf16_attention_is_exact_attention_and_compiles_to_its_bits():
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, n, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16) for n in (777, 1000, 1000))
    with torch.no_grad():
        got = fa3.attention_fa3(q, k, v)
        compiled = torch.compile(lambda a, b_, c: fa3.attention_fa3(a, b_, c), fullgraph=True)
        try:
            assert torch.equal(compiled(q, k, v), got)
        finally:
            torch._dynamo.reset()
    cos, rel = _compare(got, _fp32_attention(q, k, v))
    assert cos > 0.99999 and rel < 0.01, (cos, rel)  # bf16 attention: bf16's rounding only
