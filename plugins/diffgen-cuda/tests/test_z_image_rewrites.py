"""diffgen_cuda.z_image: fused Q/K/V and fused w1/w3 in Z-Image's blocks.

Two claims, tested apart. The rewritten attention processor and feed-forward forward are diffusers'
ops in diffusers' order: run on the unfused layers they must give diffusers' numbers bit for bit
(bf16 and fp32). Fusing the linears computes the same dot products in one GEMM, which may change
only the fp32 summation order, so a fused model is compared with the unfused one to rounding.
"""

from __future__ import annotations

import pytest
import torch

import diffgen
from diffgen.linear import QuantLinear
from diffgen.rewrites import apply_rewrites, undo_rewrites
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs
from diffgen_cuda import block_rewrite, z_image

from test_flux1_rewrites import CPU, CountingProducers, needs_cpu_scaled_mm

BLOCKS = ["noise_refiner.0", "context_refiner.0", "layers.0"]
ATTENTIONS = [f"{b}.attention" for b in BLOCKS]
FEED_FORWARDS = [f"{b}.feed_forward" for b in BLOCKS]
FUSED = {b: "z-image-fused-projections" for b in BLOCKS}


@pytest.fixture(scope="module")
def z_dir(tmp_path_factory):
    return save_tiny_transformer("z_image", tmp_path_factory.mktemp("z") / "transformer", seed=0, dtype=torch.float32)


def inputs(dtype, batch=1):
    x = tiny_transformer_inputs("z_image", tiny_transformer("z_image", seed=0), seed=1, batch=batch)
    return {k: [t.to(dtype) for t in v] if isinstance(v, list) else v.to(dtype) for k, v in x.items()}


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([o.float() for o in model(**x, return_dict=False)[0]])


def load(path, dtype, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=dtype, rewrites=False, **kwargs)


def sorted_by_model(model, names):
    order = [n for n, _ in model.named_modules()]
    return sorted(names, key=order.index)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_rewritten_forwards_on_unfused_layers_give_diffusers_numbers(z_dir, dtype, quantization):
    model = load(z_dir, dtype, quantization=quantization)
    x = inputs(dtype)
    stock = run(model, x)
    for name in ATTENTIONS:
        model.get_submodule(name).processor = z_image.FusedZImageAttnProcessor()
    for name in FEED_FORWARDS:
        ff = model.get_submodule(name)
        ff.__class__ = z_image._fused_swiglu_class(type(ff))
    assert torch.equal(run(model, x), stock)


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_model_matches_unfused(z_dir, batch):
    plain, fused = load(z_dir, torch.float32, quantization="fp8"), load(z_dir, torch.float32, quantization="fp8")
    done = apply_rewrites(fused, z_image.REWRITES, CPU)
    assert done == {n: FUSED[n] for n in sorted_by_model(fused, FUSED)}
    assert all(type(fused.get_submodule(a).processor) is z_image.FusedZImageAttnProcessor for a in ATTENTIONS)
    attn, ff = fused.get_submodule(ATTENTIONS[2]), fused.get_submodule(FEED_FORWARDS[2])
    assert isinstance(attn.to_qkv, QuantLinear) and attn.to_qkv.out_features == 3 * attn.inner_dim
    assert not hasattr(attn, "to_q") and not hasattr(ff, "w1") and not hasattr(ff, "w3")  # no weight held twice
    assert ff.w13.out_features == 2 * ff.w2.in_features
    assert ff.w13.method.layer.name == "layers.0.feed_forward.w13"
    x = inputs(torch.float32, batch)
    # fp32 model: fused and unfused GEMMs differ at most in summation order, ~1e-7 relative
    a, b = run(plain, x), run(fused, x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    # the fusion is structural: taking the rewrites out keeps it and its numbers
    undo_rewrites(fused)
    assert torch.equal(run(fused, x), b)
    # and a second pass finds nothing left to fuse
    assert apply_rewrites(fused, z_image.REWRITES, CPU) == {}


@needs_cpu_scaled_mm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w2_takes_the_swiglu_product_prepared(z_dir, dtype, monkeypatch):
    """Where w2's method takes a prepared input (on the CPU: the reference producers, PyTorch ops), the
    fused feed-forward hands it silu(w1 x) * w3 x prepared; the numbers are those of diffusers' gating
    on the same fused layers, bit for bit."""
    model = load(z_dir, dtype, quantization="fp8")
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.method = CountingProducers(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    assert apply_rewrites(model, z_image.REWRITES, CPU) == FUSED
    assert all(model.get_submodule(f).diffgen_swiglu is None for f in FEED_FORWARDS)  # no Triton on the CPU
    x = inputs(dtype)
    runs, original = [], block_rewrite.run_prepared
    monkeypatch.setattr(block_rewrite, "run_prepared", lambda *args: runs.append(args[0]) or original(*args))
    prepared = run(model, x)
    assert runs == [model.get_submodule(f"{f}.w2") for f in FEED_FORWARDS]
    monkeypatch.setattr(z_image.FusedSwiGLU, "forward",
                        lambda self, h: self.w2(self._forward_silu_gating(*self.w13(h).chunk(2, dim=-1))))
    assert torch.equal(run(model, x), prepared)


@needs_cpu_scaled_mm
def test_compiled_blocks_trace_the_fused_forwards(z_dir):
    """Under torch.compile the fused processor and feed-forward are traced in one graph with the block."""
    model = load(z_dir, torch.bfloat16, quantization="fp8")
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.method = CountingProducers(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    apply_rewrites(model, z_image.REWRITES, CPU)
    x = inputs(torch.bfloat16)
    eager = run(model, x)
    model.get_submodule(BLOCKS[2]).compile(backend="eager", fullgraph=True)  # one block: tracing takes seconds
    try:
        assert torch.equal(run(model, x), eager)
    finally:
        torch._dynamo.reset()


def test_fused_bf16_model_stays_close(z_dir):
    plain, fused = load(z_dir, torch.bfloat16, quantization="fp8"), load(z_dir, torch.bfloat16, quantization="fp8")
    apply_rewrites(fused, z_image.REWRITES, CPU)
    x = inputs(torch.bfloat16)
    a, b = run(plain, x), run(fused, x)
    # bf16: a summation-order difference may flip a rounding (2^-8 relative) and propagate through
    # the blocks; the outputs still agree to a few bf16 steps
    assert torch.allclose(a, b, rtol=3e-2, atol=3e-2 * a.abs().max().item())


def test_16bit_parts_are_left_alone(z_dir):
    model = load(z_dir, torch.float32, quantization="fp8",
                 quantization_ignored_layers=["layers.0.attention.to_k", "layers.0.feed_forward.w3"])
    declined = {}
    done = apply_rewrites(model, z_image.REWRITES, CPU, declined=declined)
    assert BLOCKS[2] not in done and "16-bit" in declined[BLOCKS[2]][1]
    assert type(model.get_submodule(ATTENTIONS[2]).processor).__name__ == "ZSingleStreamAttnProcessor"
    assert hasattr(model.get_submodule(FEED_FORWARDS[2]), "w1")
    assert set(done) == set(FUSED) - {BLOCKS[2]}
    # a 16-bit part of one of the two: the other is fused alone
    model = load(z_dir, torch.float32, quantization="fp8", quantization_ignored_layers=["layers.0.feed_forward.w3"])
    assert apply_rewrites(model, z_image.REWRITES, CPU) == FUSED
    assert hasattr(model.get_submodule(ATTENTIONS[2]), "to_qkv")
    assert hasattr(model.get_submodule(FEED_FORWARDS[2]), "w1")
    # an unquantized model: nothing to fuse through LinearMethod.fuse
    assert apply_rewrites(load(z_dir, torch.float32), z_image.REWRITES, CPU) == {}


def test_installed_plugin_publishes_the_rewrites(z_dir):
    from diffgen.plugins import get_plugin_host

    host = get_plugin_host()
    if host.plugins["cuda"].distribution != "diffgen-cuda":
        pytest.skip("diffgen-cuda is not installed (registered from the source tree): no entry points")
    published = [type(r) for r in host.rewrites()]
    assert [t for t in published if t.__module__ == z_image.__name__] == [type(r) for r in z_image.REWRITES]
    model = diffgen.load_transformer(z_dir, quantization="fp8", device="cpu", dtype=torch.float32)
    assert {n: r for n, r in model.diffgen_rewrites.items() if r.startswith("z-image")} == FUSED
    report = diffgen.inspect(z_dir, quantization="fp8")
    assert {r["rewrite"]: r["modules"] for r in report["rewrites"]}["z-image-fused-projections"] == 3


@pytest.mark.cuda
def test_fused_z_image_on_gpu_matches_unfused(z_dir):
    """On an SM89+ GPU: the Triton FP8 method fuses, w2 takes its input from FLUX.2's SwiGLU producer,
    and the fused blocks agree with the unfused ones."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plain = diffgen.load_transformer(z_dir, quantization="fp8", device="cuda", dtype=torch.bfloat16, rewrites=False)
    fused = diffgen.load_transformer(z_dir, quantization="fp8", device="cuda", dtype=torch.bfloat16)
    assert {n: r for n, r in fused.diffgen_rewrites.items() if r.startswith("z-image")} == FUSED
    assert all(fused.get_submodule(f).diffgen_swiglu is not None for f in FEED_FORWARDS)  # the Triton producer
    x = {k: [t.cuda() for t in v] if isinstance(v, list) else v.cuda() for k, v in inputs(torch.bfloat16).items()}
    a, b = run(plain, x), run(fused, x)
    # the same FP8 math (per-token scales of the same rows); the producer rounds as the bf16 ops do
    # but may differ by a bf16 step where its silu differs in the last fp32 bits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > 0.999, cos


@pytest.mark.parametrize("rows", [1, 2])
def test_rope_tables_rotate_as_the_complex_product(rows):
    """The prologue kernel's (cos, sin) tables, built from Z-Image's complex freqs_cis, rotate each
    pair of dims as diffusers' complex multiply does (the kernel's rotation, written out in fp32)."""
    batch, seq, heads, head_dim = 2, 7, 3, 16
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(rows, seq, head_dim // 2, generator=g) * 50
    freqs = torch.polar(torch.ones_like(angles), angles)
    x = torch.randn(batch, seq, heads, head_dim, generator=g).bfloat16()
    cos, sin = z_image.rope_tables(freqs)
    assert cos.shape == sin.shape == ((seq, head_dim) if rows == 1 else (rows, seq, head_dim))
    y = x.float()
    rotated = torch.stack([-y[..., 1::2], y[..., 0::2]], dim=-1).flatten(-2)  # (y0, y1) -> (-y1, y0)
    if rows == 1:
        cos, sin = cos[None], sin[None]
    got = y * cos[:, :, None] + rotated * sin[:, :, None]
    want = torch.view_as_real(torch.view_as_complex(y.reshape(batch, seq, heads, -1, 2)) * freqs[:, :, None]).flatten(3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.bfloat16(), z_image._apply_rotary_emb(x, freqs))  # and so, rounded, on this CPU


def test_prologue_kernel_is_not_offered_off_the_gpu():
    attn = diffusers_z_attention(heads=2, head_dim=16)
    qkv = torch.randn(1, 5, 96).bfloat16()
    freqs = torch.polar(torch.ones(1, 5, 8), torch.rand(1, 5, 8))
    assert z_image.prologue_args(attn, qkv, freqs) is None


def diffusers_z_attention(heads, head_dim, device="cpu"):
    """An attention built as diffusers' ZImageTransformerBlock builds it, bf16, its norms' weights
    spread so that each dim has its own."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    attn = Attention(query_dim=heads * head_dim, cross_attention_dim=None, dim_head=head_dim, heads=heads,
                     qk_norm="rms_norm", eps=1e-5, bias=False, out_bias=False, processor=ZSingleStreamAttnProcessor())
    attn = attn.to(device, torch.bfloat16)
    with torch.no_grad():
        attn.norm_q.weight.normal_(1, 0.3)
        attn.norm_k.weight.normal_(1, 0.3)
    return attn


gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU (SM89+) with Triton")


def _gpu_processor():
    from diffgen.platform import resolve

    processor = z_image.FusedZImageAttnProcessor()
    processor.diffgen_qk_norm_rope = block_rewrite.prologue_kernels(resolve("cuda")[0])
    assert processor.diffgen_qk_norm_rope is not None
    return processor


def _diffusers_ops(attn, qkv, freqs):
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in qkv.chunk(3, dim=-1))
    q, k = attn.norm_q(q), attn.norm_k(k)
    return z_image._apply_rotary_emb(q, freqs), z_image._apply_rotary_emb(k, freqs), v


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("batch,rows,seq,heads,head_dim", [(1, 1, 300, 3, 128), (2, 2, 37, 2, 64), (2, 1, 40, 4, 32)])
def test_prologue_kernel_matches_diffusers_ops(batch, rows, seq, heads, head_dim):
    """The fused processor's prologue (one kernel) against diffusers' ops after the projection:
    diffusers' RMSNorm (rounded twice, as the kernel's round_normed does), then the complex RoPE."""
    from test_producers_gpu import assert_close_values

    attn = diffusers_z_attention(heads, head_dim, "cuda")
    qkv = (torch.randn(batch, seq, 3 * heads * head_dim, device="cuda") * 3).bfloat16()
    angles = torch.rand(rows, seq, head_dim // 2, device="cuda") * 100
    freqs = torch.polar(torch.ones_like(angles), angles)
    with torch.no_grad():
        got = _gpu_processor()._fused_prologue(attn, qkv, freqs)
        want = _diffusers_ops(attn, qkv, freqs)
    assert got is not None
    assert torch.equal(got[2], want[2])
    for t, ref in zip(got[:2], want[:2]):
        assert t.shape == ref.shape and t.dtype == ref.dtype
        # the norm may differ by one bf16 step (the order of the sum of squares); RoPE adds two products
        assert_close_values(t, ref, 2 ** -7, slack=2 ** -7 * 2 * ref.abs().amax(dim=-1, keepdim=True))


@gpu
@pytest.mark.cuda
def test_prologue_kernel_declines_what_it_does_not_compute():
    attn = diffusers_z_attention(2, 64, "cuda")
    qkv = torch.randn(1, 9, 384, device="cuda").bfloat16()
    freqs = torch.polar(torch.ones(1, 9, 32, device="cuda"), torch.rand(1, 9, 32, device="cuda"))
    processor = _gpu_processor()
    assert processor._fused_prologue(attn, qkv, freqs) is not None
    assert processor._fused_prologue(attn, qkv.half(), freqs) is None  # fp16 activations
    assert processor._fused_prologue(attn, qkv, freqs[:, :8]) is None  # RoPE for 8 rows, not 9
    assert processor._fused_prologue(attn, torch.cat([qkv, qkv]), torch.cat([freqs] * 3)) is None  # 3 rows for 2
    attn.norm_k.eps = 1e-6
    assert processor._fused_prologue(attn, qkv, freqs) is None  # two eps values
    attn.norm_k = torch.nn.RMSNorm(64, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    assert processor._fused_prologue(attn, qkv, freqs) is None  # another norm's rounding


@gpu
@pytest.mark.cuda
def test_prologue_operator_in_a_compiled_graph_gives_the_kernels_bits():
    attn = diffusers_z_attention(3, 128, "cuda")
    qkv = torch.randn(1, 100, 1152, device="cuda").bfloat16()
    angles = torch.rand(1, 100, 64, device="cuda") * 100
    freqs = torch.polar(torch.ones_like(angles), angles)
    processor = _gpu_processor()
    compiled = torch.compile(lambda q, f: processor._fused_prologue(attn, q, f), fullgraph=True)
    try:
        with torch.no_grad():
            got, want = compiled(qkv, freqs), processor._fused_prologue(attn, qkv, freqs)
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
