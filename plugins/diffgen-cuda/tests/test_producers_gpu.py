"""The fused producers (LayerNorm + modulation, GELU + concat, each with FP8 quantization) against
the PyTorch ops they replace (Fp8ScaledMMMethod's references), the attention prologue kernel
against diffusers' ops, and the rewritten FLUX.1 blocks against diffusers' forward, on the GPU.
The rewrite's wiring is tested exactly on the CPU (test_flux1_rewrites.py)."""

from __future__ import annotations

import pytest
import torch

import diffgen
from diffgen.builtin.fp8_methods import Fp8ScaledMMMethod
from diffgen.platform import resolve
from diffgen.rewrites import undo_rewrites
from diffgen.testing.layers import fp8_linear
from diffgen_cuda.flux1 import fused_qk_norm_rope, prologue_kernels, qk_norm_rope
from diffgen_cuda.fused import Fp8TritonMethod

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU with FP8 (SM89+) and Triton")


def _pair(k, activation):
    weight = (torch.randn(64, k) * 0.05).cuda()
    return [fp8_linear(cls, weight, scheme="per-channel", activation=activation, input_scale=6.0 / 448)
            for cls in (Fp8ScaledMMMethod, Fp8TritonMethod)]


def assert_close_values(y, ref, ulp, slack=0.0):
    """y differs from ref only by rounding, rarely: at most one step of a format with ``ulp`` relative
    precision (plus the subnormal floor), and ``slack``, what a one-step difference in the operands
    of a sum can leave in a smaller result."""
    y, ref = y.float(), ref.float()
    off = y != ref
    assert off.float().mean() < 0.01, f"{off.float().mean():.4f} of the values differ"
    bound = ulp * ref.abs() + ulp * 2 ** -6 * ref.abs().max() + slack
    assert ((y - ref).abs() <= bound)[off].all()


def assert_same_quantization(got, want, slack=0.0):
    (q, s), (q_ref, s_ref) = got, want
    if s_ref.numel() > 1:
        assert s.shape == s_ref.shape
        assert_close_values(s, s_ref, 2 ** -7)  # the row's amax may move by one bf16 step
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
    # One e4m3 step (2^-3) and the scale's; the y difference may cross a step boundary too.
    assert_close_values(q.float() * s, q_ref.float() * s_ref, 2 ** -2, slack)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("batch,seq,k", [(1, 300, 3072), (2, 37, 48)])
def test_norm_modulate_matches_the_pytorch_ops(activation, batch, seq, k):
    torch.manual_seed(0)
    builtin, fused = _pair(k, activation)
    x = (torch.randn(batch, seq, k, device="cuda") * 4 + 1).bfloat16()
    emb = (torch.randn(batch, 6 * k, device="cuda") * 0.5).bfloat16()
    shift, scale = emb.chunk(6, dim=1)[:2]  # strided views, as diffusers passes them
    with torch.no_grad():
        want, y_ref = builtin.method.prepare_norm_modulate(builtin, x, shift, scale, 1e-6, True)
        got, y = fused.method.prepare_norm_modulate(fused, x, shift, scale, 1e-6, True)
        got_only, none = fused.method.prepare_norm_modulate(fused, x, shift, scale, 1e-6, False)
    assert none is None and torch.equal(got_only[0].view(torch.uint8), got[0].view(torch.uint8))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # LayerNorm's output may differ by one bf16 step (reduction order); through * (1 + scale) + shift it
    # moves y by a step of the product, which is large against y where the sum cancels.
    product = (torch.nn.functional.layer_norm(x.float(), (k,), eps=1e-6) * (1 + scale.float()[:, None])).abs()
    slack = 2 ** -7 * product.reshape(y.shape)
    assert_close_values(y, y_ref, 2 ** -7, slack)
    assert_same_quantization(got, want, slack.reshape(-1, k))


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("ka,kh", [(3072, 12288), (0, 12288), (48, 80)])
def test_gelu_concat_matches_the_pytorch_ops(activation, ka, kh):
    torch.manual_seed(1)
    builtin, fused = _pair(ka + kh, activation)
    h = (torch.randn(2, 150, kh, device="cuda") * 2).bfloat16()
    a = (torch.randn(2, 150, ka, device="cuda")).bfloat16() if ka else None
    with torch.no_grad():
        want = builtin.method.prepare_gelu_concat(builtin, a, h)
        got = fused.method.prepare_gelu_concat(fused, a, h)
    assert_same_quantization(got, want)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_gelu_concat_operator_in_a_compiled_graph_gives_the_kernels_bits(activation):
    _, fused = _pair(3072 + 1024, activation)
    h = (torch.randn(2, 70, 1024, device="cuda") * 2).bfloat16()
    a = torch.randn(2, 70, 3072, device="cuda").bfloat16()
    compiled = torch.compile(lambda a, h: fused.method.prepare_gelu_concat(fused, a, h), fullgraph=True)
    try:
        with torch.no_grad():
            (q, s), (q_ref, s_ref) = compiled(a, h), fused.method.prepare_gelu_concat(fused, a, h)
    finally:
        torch._dynamo.reset()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@gpu
@pytest.mark.cuda
def test_rewritten_flux_blocks_match_diffusers_forward(tmp_path):
    from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer_inputs

    path = save_tiny_transformer("flux1", tmp_path / "transformer", seed=0, dtype=torch.bfloat16)
    model = diffgen.load_transformer(path, quantization="fp8", device="cuda", dtype=torch.bfloat16)
    assert model.diffgen_rewrites == {"transformer_blocks.0.attn": "flux1-fused-qkv",
                                      "transformer_blocks.0": "flux1-double-block",
                                      "single_transformer_blocks.0.attn": "flux1-fused-qkv",
                                      "single_transformer_blocks.0": "flux1-single-block"}
    inputs = {k: (v.cuda().bfloat16() if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
              for k, v in tiny_transformer_inputs("flux1", model, seed=1).items()}
    blocks = [model.get_submodule(name) for name in ("transformer_blocks.0", "single_transformer_blocks.0")]
    try:
        with torch.no_grad():
            fused = model(**inputs, return_dict=False)[0].float()
            for block in blocks:
                block.compile(fullgraph=True)
            compiled = model(**inputs, return_dict=False)[0].float()
            for block in blocks:
                block._compiled_call_impl = None
            undo_rewrites(model)
            stock = model(**inputs, return_dict=False)[0].float()
    finally:
        torch._dynamo.reset()
    # Rounding differences only (bf16 steps, rarely an FP8 step), through two blocks.
    for out in (fused, compiled):
        assert torch.nn.functional.cosine_similarity(out.flatten(), stock.flatten(), dim=0) > 0.9995


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_gelu_concat_at_extreme_inputs(activation):
    # GELU's tails (exp overflowing to inf, outputs underflowing to zero) and a NaN row.
    builtin, fused = _pair(96, activation)
    values = torch.tensor([-1e4, -100.0, -20.0, -9.0, -3.0, -0.75, -1e-3, 0.0, 1e-3, 0.75, 3.0, 9.0, 20.0, 100.0])
    h = values[torch.randint(len(values), (3, 8, 64))].cuda().bfloat16()
    a = torch.randn(3, 8, 32, device="cuda").bfloat16()
    with torch.no_grad():
        want = builtin.method.prepare_gelu_concat(builtin, a, h)
        got = fused.method.prepare_gelu_concat(fused, a, h)
        assert_same_quantization(got, want)
        h[1, 2, 5] = float("nan")
        q, _ = fused.method.prepare_gelu_concat(fused, a, h)
    assert q.float().reshape(3, 8, 96)[1, 2, 32 + 5].isnan()


def _flux_attention(heads, head_dim, joint):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(3)
    attn = FluxAttention(heads * head_dim, heads, head_dim, added_kv_proj_dim=heads * head_dim if joint else None,
                         eps=1e-6, pre_only=not joint).cuda().bfloat16()
    for name, p in attn.named_parameters():
        if name.startswith("norm_"):
            p.data.normal_(1, 0.3)  # RMSNorm starts at ones; give each dim its own weight
    return attn


def _kernels():
    kernels = prologue_kernels(resolve("cuda")[0])
    assert kernels is not None
    return kernels


def _rope(seq, head_dim):
    angles = torch.rand(seq, head_dim // 2, device="cuda", dtype=torch.float64) * 100
    # FluxPosEmbed's layout: each frequency twice (repeat_interleave), fp32
    return tuple(f(angles).repeat_interleave(2, dim=1).float() for f in (torch.cos, torch.sin))


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("batch,img,txt,heads,head_dim,rope", [
    (1, 300, 77, 3, 128, True), (2, 37, 5, 2, 64, True), (1, 40, 8, 2, 16, False)])
def test_qk_norm_rope_matches_diffusers_ops(joint, batch, img, txt, heads, head_dim, rope):
    attn = _flux_attention(heads, head_dim, joint)
    qkv = (torch.randn(batch, img, 3 * heads * head_dim, device="cuda") * 3).bfloat16()
    context = (torch.randn(batch, txt, 3 * heads * head_dim, device="cuda") * 3).bfloat16() if joint else None
    freqs = _rope(img + (txt if joint else 0), head_dim) if rope else None
    with torch.no_grad():
        got = fused_qk_norm_rope(_kernels(), attn, qkv, context, freqs)
        want = qk_norm_rope(attn, qkv, context, freqs)
    assert got is not None
    (q, k, v), (q_ref, k_ref, v_ref) = got, want
    assert torch.equal(v, v_ref)
    for t, ref in ((q, q_ref), (k, k_ref)):
        assert t.shape == ref.shape and t.dtype == ref.dtype
        # RMSNorm's output may differ by one bf16 step (the order of the sum of squares); RoPE then
        # adds two such products.
        assert_close_values(t, ref, 2 ** -7, slack=2 ** -7 * 2 * ref.abs().amax(dim=-1, keepdim=True))


@gpu
@pytest.mark.cuda
def test_qk_norm_rope_declines_what_it_does_not_compute():
    attn = _flux_attention(2, 64, True)
    qkv, context = (torch.randn(1, 9, 384, device="cuda").bfloat16() for _ in range(2))
    assert fused_qk_norm_rope(_kernels(), attn, qkv.half(), context.half(), None) is None  # fp16 activations
    assert fused_qk_norm_rope(_kernels(), attn, qkv, context, _rope(9, 64)) is None  # RoPE for 9 rows, not 18
    attn.norm_k.eps = 1e-5
    assert fused_qk_norm_rope(_kernels(), attn, qkv, context, None) is None  # two eps values


@gpu
@pytest.mark.cuda
def test_qk_norm_rope_operator_in_a_compiled_graph_gives_the_kernels_bits():
    attn = _flux_attention(3, 128, True)
    qkv = torch.randn(1, 100, 1152, device="cuda").bfloat16()
    context = torch.randn(1, 20, 1152, device="cuda").bfloat16()
    freqs = _rope(120, 128)
    kernels = _kernels()
    compiled = torch.compile(lambda *a: fused_qk_norm_rope(kernels, attn, *a), fullgraph=True)
    try:
        with torch.no_grad():
            got, want = compiled(qkv, context, freqs), fused_qk_norm_rope(kernels, attn, qkv, context, freqs)
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
