"""FLUX.2 on the GPU: the SwiGLU + concat + FP8 producer (kernels/swiglu_quant.py) against the
PyTorch ops it replaces, FLUX.1's prologue kernel on FLUX.2's tensors (the single block's Q/K/V is a
strided slice of to_qkv_mlp_proj's output) against diffusers' ops, and the rewritten FP8 blocks
against FP8 in diffusers' blocks. The rewrite's wiring is tested exactly on the CPU
(test_flux2_rewrites.py)."""

from __future__ import annotations

import pytest
import torch

import diffgen
from diffgen.builtin.fp8_methods import Fp8ScaledMMMethod
from diffgen.platform import resolve
from diffgen.rewrites import undo_rewrites
from diffgen.testing.layers import fp8_linear
from diffgen_cuda import block_rewrite, flux2
from diffgen_cuda.flux1 import fused_qk_norm_rope, prologue_kernels
from diffgen_cuda.fused import Fp8TritonMethod

from test_producers_gpu import _rope, assert_close_values, assert_same_quantization, gpu


def _pair(k, activation):
    weight = (torch.randn(64, k) * 0.05).cuda()
    return [fp8_linear(cls, weight, scheme="per-channel", activation=activation, input_scale=6.0 / 448)
            for cls in (Fp8ScaledMMMethod, Fp8TritonMethod)]


def _prepare(layer, a, h):
    kernels = block_rewrite.swiglu_kernels(resolve("cuda")[0])
    assert kernels is not None
    with torch.no_grad():
        return block_rewrite.prepare_swiglu_concat(kernels, layer.method, layer, a, h)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("ka,ki", [(6144, 18432), (0, 18432), (48, 80)])
def test_swiglu_concat_matches_the_pytorch_ops(activation, ka, ki):
    torch.manual_seed(1)
    builtin, fused = _pair(ka + ki, activation)
    # h as the single block hands it over: the MLP columns of to_qkv_mlp_proj's wider output
    wide = (torch.randn(2, 150, 3 * 64 + 2 * ki, device="cuda") * 2).bfloat16()
    h = wide[..., 3 * 64:]
    a = torch.randn(2, 150, ka, device="cuda").bfloat16() if ka else None
    # builtin: swiglu_concat's PyTorch ops, then the method's quantization; fused: the Triton producer.
    # silu's exp may differ in its last fp32 ulp, which moves the bf16-rounded value by one step at most.
    assert_same_quantization(_prepare(fused, a, h), _prepare(builtin, a, h))


@gpu
@pytest.mark.cuda
def test_swiglu_concat_at_extreme_inputs():
    builtin, fused = _pair(96, "dynamic")
    values = torch.tensor([-1e4, -100.0, -20.0, -9.0, -3.0, -0.75, -1e-3, 0.0, 1e-3, 0.75, 3.0, 9.0, 20.0, 100.0])
    h = values[torch.randint(len(values), (3, 8, 128))].cuda().bfloat16()
    a = torch.randn(3, 8, 32, device="cuda").bfloat16()
    assert_same_quantization(_prepare(fused, a, h), _prepare(builtin, a, h))
    h[1, 2, 5] = float("nan")
    q, _ = _prepare(fused, a, h)
    assert q.float().reshape(3, 8, 96)[1, 2, 32 + 5].isnan()


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_swiglu_operator_in_a_compiled_graph_gives_the_kernels_bits(activation):
    _, fused = _pair(3072 + 1024, activation)
    h = (torch.randn(2, 70, 2048, device="cuda") * 2).bfloat16()
    a = torch.randn(2, 70, 3072, device="cuda").bfloat16()
    kernels = block_rewrite.swiglu_kernels(resolve("cuda")[0])
    compiled = torch.compile(lambda a, h: block_rewrite.prepare_swiglu_concat(kernels, fused.method, fused, a, h),
                             fullgraph=True)
    try:
        with torch.no_grad():
            (q, s), (q_ref, s_ref) = compiled(a, h), _prepare(fused, a, h)
    finally:
        torch._dynamo.reset()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("joint", [True, False])
def test_prologue_kernel_on_flux2_attention(joint):
    from diffusers.models.transformers.transformer_flux2 import Flux2Attention, Flux2ParallelSelfAttention

    torch.manual_seed(3)
    heads, head_dim, img, txt = 4, 128, 200, 40
    dim = heads * head_dim
    if joint:
        attn = Flux2Attention(dim, heads, head_dim, added_kv_proj_dim=dim, out_dim=dim, eps=1e-6)
    else:
        attn = Flux2ParallelSelfAttention(dim, heads, head_dim, out_dim=dim, eps=1e-6, mlp_ratio=3.0)
    attn = attn.cuda().bfloat16()
    for name, p in attn.named_parameters():
        if name.startswith("norm_"):
            p.data.normal_(1, 0.3)
    seq = img + (txt if joint else 0)
    wide = (torch.randn(1, seq if not joint else img, 3 * dim + 6 * dim, device="cuda") * 3).bfloat16()
    qkv = wide[..., :3 * dim]  # strided rows, as the single block's split leaves them
    context = (torch.randn(1, txt, 3 * dim, device="cuda") * 3).bfloat16() if joint else None
    freqs = _rope(seq, head_dim)
    kernels = prologue_kernels(resolve("cuda")[0])
    with torch.no_grad():
        got = fused_qk_norm_rope(kernels, attn, qkv, context, freqs)
        want = flux2.qk_norm_rope(attn, [qkv], None if context is None else [context], freqs)
    assert got is not None
    assert torch.equal(got[2], want[2])
    for t, ref in zip(got[:2], want[:2]):
        # as test_producers_gpu.test_qk_norm_rope_matches_diffusers_ops: one bf16 step of RMSNorm, twice
        assert_close_values(t, ref, 2 ** -7, slack=2 ** -7 * 2 * ref.abs().amax(dim=-1, keepdim=True))


@gpu
@pytest.mark.cuda
def test_rewritten_fp8_blocks_match_fp8_in_diffusers_blocks(tmp_path):
    from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer_inputs

    path = save_tiny_transformer("flux2", tmp_path / "transformer", seed=0, dtype=torch.bfloat16)
    model = diffgen.load_transformer(path, quantization="fp8", device="cuda", dtype=torch.bfloat16)
    assert model.diffgen_rewrites == {"transformer_blocks.0.attn": "flux2-fused-qkv",
                                      "transformer_blocks.0": "flux2-double-block",
                                      "single_transformer_blocks.0": "flux2-single-block"}
    blocks = [model.get_submodule(name) for name in ("transformer_blocks.0", "single_transformer_blocks.0")]
    assert all(b.diffgen_qk_norm_rope is not None and b.diffgen_swiglu is not None for b in blocks)
    inputs = {k: (v.cuda().bfloat16() if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
              for k, v in tiny_transformer_inputs("flux2", model, seed=1).items()}
    try:
        with torch.no_grad():
            fused = model(**inputs, return_dict=False)[0].float()
            for block in blocks:
                block.compile(fullgraph=True)
            compiled = model(**inputs, return_dict=False)[0].float()
            for block in blocks:
                block._compiled_call_impl = None
            undo_rewrites(model)  # Q/K/V stay fused (exact); the blocks run diffusers' forward
            stock = model(**inputs, return_dict=False)[0].float()
    finally:
        torch._dynamo.reset()
    # Rounding differences only (bf16 steps, rarely an FP8 step), through two blocks.
    for out in (fused, compiled):
        assert torch.nn.functional.cosine_similarity(out.flatten(), stock.flatten(), dim=0) > 0.9995
