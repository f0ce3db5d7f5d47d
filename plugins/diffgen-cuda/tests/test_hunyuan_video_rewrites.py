"""diffgen_cuda.hunyuan_video: fused Q/K/V, HunyuanVideo's blocks with prepared inputs, and the
text mask that masks nothing (or only trailing padding) left out of attention.

As for FLUX.1 (test_flux1_rewrites.py, whose reasoning holds here): on the CPU the prepared inputs
come from Fp8ScaledMMMethod's PyTorch producers, the very ops of diffusers' blocks, so the rewritten
blocks must give diffusers' numbers bit for bit. Fusing Q/K/V changes only the fp32 summation order,
so a fused model is compared with the unfused one to rounding; so is attention without the mask,
which runs another SDPA kernel than the masked one.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import diffgen
from diffgen.linear import QuantLinear
from diffgen.rewrites import apply_rewrites, undo_rewrites
from diffgen.testing.rewrites import assert_rewrites_exact
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs
from diffgen_cuda import hunyuan_video

from test_flux1_rewrites import CPU, CountingProducers, needs_cpu_scaled_mm, static_fp8_checkpoint

ATTENTIONS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0"]
FUSE = [r for r in hunyuan_video.REWRITES if r.name == "hunyuan-video-fused-qkv"]
DOUBLE, SINGLE = hunyuan_video.HunyuanVideoDoubleBlock(fuse=False), hunyuan_video.HunyuanVideoSingleBlock(fuse=False)
# Double block: video Q/K/V, text Q/K/V and both feed-forwards' first linears from a norm pass each;
# single block: one norm pass for Q/K/V and proj_mlp. GELU feeds both ff.net.2 and proj_out (with attention).
ALL_CALLS = Counter(norm_modulate=5, gelu_concat=3)
ALL_REWRITTEN = {BLOCKS[0]: "hunyuan-video-double-block", BLOCKS[1]: "hunyuan-video-single-block",
                 "": "hunyuan-video-text-keys"}


@pytest.fixture(scope="module")
def hv_dir(tmp_path_factory):
    return save_tiny_transformer("hunyuan_video", tmp_path_factory.mktemp("hv") / "transformer", seed=0,
                                 dtype=torch.float32)


def inputs(dtype, batch=1, seed=1):
    x = tiny_transformer_inputs("hunyuan_video", tiny_transformer("hunyuan_video", seed=0), seed=seed, batch=batch)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}


def run(model, x) -> torch.Tensor:
    """The model's output and every block's outputs, both streams, flattened: the last single block's
    text tokens never reach the model's output, so a slip there shows only in the blocks'."""
    outputs = []
    hooks = [model.get_submodule(b).register_forward_hook(lambda m, args, out: outputs.extend(out)) for b in BLOCKS]
    try:
        with torch.no_grad():
            y = model(**x, return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([t.float().flatten() for t in [y, *outputs]])


def load(path, dtype=torch.bfloat16, counting=True, **kwargs):
    """The model with its quantized linears on CountingProducers (prepared inputs, counted), nothing rewritten."""
    model = diffgen.load_transformer(path, device="cpu", dtype=dtype, rewrites=False, **kwargs)
    for layer in model.modules():
        if counting and isinstance(layer, QuantLinear):
            layer.method = CountingProducers(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    return model


def close(a, b, rel):
    return torch.allclose(a, b, rtol=rel, atol=rel * a.abs().max().item())


# -- Q/K/V fusion ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_processor_on_unfused_projections_gives_diffusers_numbers(hv_dir, dtype):
    model, x = load(hv_dir, dtype, counting=False, quantization="fp8"), inputs(dtype)
    stock = run(model, x)
    for name in ATTENTIONS:
        model.get_submodule(name).processor = hunyuan_video.FusedHunyuanVideoAttnProcessor()
    assert torch.equal(run(model, x), stock)


def test_fused_attention_matches_unfused(hv_dir):
    plain = load(hv_dir, torch.float32, counting=False, quantization="fp8")
    fused = load(hv_dir, torch.float32, counting=False, quantization="fp8")
    assert apply_rewrites(fused, FUSE, CPU) == {b: "hunyuan-video-fused-qkv" for b in BLOCKS}
    double, single = (fused.get_submodule(a) for a in ATTENTIONS)
    assert isinstance(double.to_qkv, QuantLinear) and isinstance(double.to_added_qkv, QuantLinear)
    assert not hasattr(double, "to_q") and not hasattr(double, "add_q_proj")  # no weight held twice
    assert single.to_qkv.out_features == 3 * single.inner_dim and not hasattr(single, "to_added_qkv")
    assert type(double.processor).__name__ == "FusedHunyuanVideoAttnProcessor"
    x = inputs(torch.float32)
    # fp32: the fused GEMM differs from its parts at most in summation order, ~1e-7 relative
    assert close(run(plain, x), run(fused, x), 1e-5)


def test_16bit_projections_stay_apart(hv_dir):
    model = load(hv_dir, counting=False, quantization="fp8",
                 quantization_ignored_layers=["transformer_blocks.0.attn.add_k_proj"])
    declined = {}
    assert apply_rewrites(model, FUSE, CPU, declined=declined) == {BLOCKS[1]: "hunyuan-video-fused-qkv"}
    assert "16-bit" in declined[BLOCKS[0]][1]
    assert hasattr(model.get_submodule(ATTENTIONS[0]), "to_q")


# -- blocks with prepared inputs -------------------------------------------------------------
def assert_blocks_exact(model, x, expected_calls=ALL_CALLS):
    done = assert_rewrites_exact(model, x, [DOUBLE, SINGLE], CPU, run=run)
    assert list(done) == BLOCKS
    CountingProducers.calls.clear()
    run(model, x)
    assert CountingProducers.calls == expected_calls  # the producers did run
    undo_rewrites(model)


@needs_cpu_scaled_mm
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rewritten_blocks_give_diffusers_numbers(hv_dir, fuse, dtype):
    model = load(hv_dir, dtype, quantization="fp8")
    if fuse:
        apply_rewrites(model, FUSE, CPU)
    assert_blocks_exact(model, inputs(dtype))


@needs_cpu_scaled_mm
def test_padded_text_and_a_batch_of_two(hv_dir):
    """Two samples with text masks of different lengths: diffusers' mask reaches attention, each
    sample takes its own modulation rows."""
    x = inputs(torch.bfloat16, batch=2, seed=2)
    x["encoder_attention_mask"] = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    assert_blocks_exact(load(hv_dir, quantization="fp8"), x)


@needs_cpu_scaled_mm
def test_16bit_linears_get_the_16bit_value(hv_dir):
    model = load(hv_dir, quantization="fp8", quantization_ignored_layers=[
        "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2"])
    assert type(model.get_submodule("single_transformer_blocks.0.proj_mlp")) is torch.nn.Linear
    assert_blocks_exact(model, inputs(torch.bfloat16), Counter(norm_modulate=5, gelu_concat=2))


def test_blocks_whose_linears_take_no_prepared_input_run_diffusers_ops(hv_dir):
    # On the CPU the fp8 family runs its reference method, which takes no prepared input; a 16-bit model none.
    for quantization in ("fp8", None):
        model = load(hv_dir, counting=False, quantization=quantization)
        assert list(assert_rewrites_exact(model, inputs(torch.bfloat16), [DOUBLE, SINGLE], CPU, run=run)) == BLOCKS
    model = load(hv_dir, counting=False, quantization="fp8")
    assert apply_rewrites(model, hunyuan_video.REWRITES, CPU) == ALL_REWRITTEN
    assert all(hasattr(model.get_submodule(a), "to_qkv") for a in ATTENTIONS)


def test_unequal_static_scales_on_one_input_leave_the_block_to_the_fusion(hv_dir, tmp_path):
    ckpt = static_fp8_checkpoint(hv_dir, tmp_path / "fp8", {"single_transformer_blocks.0.proj_mlp": 5.0 / 448})
    model, declined = load(ckpt), {}
    done = apply_rewrites(model, hunyuan_video.REWRITES, CPU, declined=declined)
    assert done == {BLOCKS[0]: "hunyuan-video-double-block", BLOCKS[1]: "hunyuan-video-fused-qkv",
                    "": "hunyuan-video-text-keys"}
    assert hasattr(model.get_submodule(ATTENTIONS[1]), "to_qkv")


@needs_cpu_scaled_mm
def test_blocks_called_with_diffusers_keywords(hv_dir):
    """Each block's own argument names (freqs_cis in the dual block, image_rotary_emb in the single
    one) reach the rewritten forward, with the token-replace extras the model passes ignored as there."""
    model = load(hv_dir, quantization="fp8")
    g = torch.Generator().manual_seed(3)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    video, text = torch.randn(1, 16, dim, generator=g).bfloat16(), torch.randn(1, 8, dim, generator=g).bfloat16()
    temb = torch.randn(1, dim, generator=g).bfloat16()
    rope = model.rope(torch.zeros(1, 16, 1, 4, 4))
    rope = tuple(t.bfloat16() for t in rope)
    mask = torch.ones(1, 1, 1, 24, dtype=torch.bool)
    calls = [(BLOCKS[0], dict(attention_mask=mask, freqs_cis=rope)),
             (BLOCKS[1], dict(attention_mask=mask, image_rotary_emb=rope, token_replace_emb=None))]
    with torch.no_grad():
        stock = [model.get_submodule(b)(video, text, temb, **kw) for b, kw in calls]
        apply_rewrites(model, [DOUBLE, SINGLE], CPU)
        CountingProducers.calls.clear()
        rewritten = [model.get_submodule(b)(video, text, temb, **kw) for b, kw in calls]
    assert CountingProducers.calls == ALL_CALLS
    for a, b in zip(stock, rewritten):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_cpu_scaled_mm
def test_a_custom_processor_set_later_runs_diffusers_forward(hv_dir):
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    class Custom(HunyuanVideoAttnProcessor2_0):
        pass

    model, x = load(hv_dir, quantization="fp8"), inputs(torch.bfloat16)
    stock = run(model, x)
    apply_rewrites(model, [DOUBLE, SINGLE], CPU)
    for name in ATTENTIONS:
        model.get_submodule(name).processor = Custom()
    CountingProducers.calls.clear()
    assert torch.equal(run(model, x), stock)
    assert not CountingProducers.calls


@needs_cpu_scaled_mm
def test_compiled_blocks_trace_the_rewritten_forward(hv_dir):
    model, x = load(hv_dir, quantization="fp8"), inputs(torch.bfloat16)
    apply_rewrites(model, FUSE, CPU)
    stock = run(model, x)
    apply_rewrites(model, [DOUBLE, SINGLE], CPU)
    for name in BLOCKS:
        model.get_submodule(name).compile(backend="eager", fullgraph=True)
    CountingProducers.calls.clear()
    try:
        assert torch.equal(run(model, x), stock)
        assert CountingProducers.calls == ALL_CALLS  # counted while tracing
    finally:
        torch._dynamo.reset()


# -- the text mask -----------------------------------------------------------------------------
@needs_cpu_scaled_mm
@pytest.mark.parametrize("real", [8, 5])
def test_attention_reads_only_the_real_text_keys(hv_dir, real, monkeypatch):
    import diffusers.models.attention_dispatch as dispatch

    model, x = load(hv_dir, torch.float32, quantization="fp8"), inputs(torch.float32)
    x["encoder_attention_mask"] = torch.tensor([[1] * real + [0] * (8 - real)])
    stock = run(model, x)
    done = apply_rewrites(model, hunyuan_video.REWRITES, CPU)
    assert done[""] == "hunyuan-video-text-keys"
    seen = []
    original = dispatch.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((key.shape[1], attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(dispatch, "dispatch_attention_fn", spy)
    rewritten = run(model, x)
    video = 4 * 4  # the tiny input's latent tokens
    assert seen == [(video + real, None), (video + real, None)]
    # the same attention with masked keys left out instead of masked: another SDPA path (fp32, ~1e-6)
    assert close(stock, rewritten, 1e-4)
    assert all(b.diffgen_text_keys is None for b in (model.get_submodule(n) for n in BLOCKS))  # reset after the call
    undo_rewrites(model)
    assert torch.equal(run(model, x), stock)


@needs_cpu_scaled_mm
def test_unequal_text_lengths_keep_the_mask(hv_dir):
    model, x = load(hv_dir, quantization="fp8"), inputs(torch.bfloat16, batch=2)
    x["encoder_attention_mask"] = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    stock = run(model, x)
    apply_rewrites(model, hunyuan_video.REWRITES, CPU)
    assert torch.equal(run(model, x), stock)  # the mask reaches attention as in diffusers: exact


def test_installed_plugin_publishes_the_rewrites(hv_dir):
    from diffgen.plugins import get_plugin_host

    host = get_plugin_host()
    if host.plugins["cuda"].distribution != "diffgen-cuda":
        pytest.skip("diffgen-cuda is not installed (registered from the source tree): no entry points")
    published = [type(r) for r in host.rewrites()]
    assert [t for t in published if t.__module__ == hunyuan_video.__name__] == \
        [type(r) for r in hunyuan_video.REWRITES]
    model = diffgen.load_transformer(hv_dir, quantization="fp8", device="cpu", dtype=torch.float32)
    assert model.diffgen_rewrites == ALL_REWRITTEN
    report = diffgen.inspect(hv_dir, quantization="fp8")
    offered = [(r["rewrite"], r["block_class"], r["modules"]) for r in report["rewrites"]
               if r["rewrite"].startswith("hunyuan-video")]
    assert offered == [("hunyuan-video-double-block", "HunyuanVideoTransformerBlock", 1),
                       ("hunyuan-video-single-block", "HunyuanVideoSingleTransformerBlock", 1),
                       ("hunyuan-video-fused-qkv", "HunyuanVideoTransformerBlock", 1),
                       ("hunyuan-video-fused-qkv", "HunyuanVideoSingleTransformerBlock", 1),
                       ("hunyuan-video-text-keys", "HunyuanVideoTransformer3DModel", 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("real", [8, 5])
def test_rewritten_hunyuan_video_on_gpu(hv_dir, real):
    """On an SM89+ GPU the Triton FP8 method takes prepared inputs: every rewrite applies, and the
    rewritten model agrees with FP8 in diffusers' blocks (same FP8 math; the producers round as the
    bf16 ops do but for reduction order, test_producers_gpu.py bounds that; attention on the real
    text keys without a mask runs another SDPA kernel), with and without text padding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plain = diffgen.load_transformer(hv_dir, quantization="fp8", device="cuda", dtype=torch.bfloat16, rewrites=False)
    model = diffgen.load_transformer(hv_dir, quantization="fp8", device="cuda", dtype=torch.bfloat16)
    assert model.diffgen_rewrites == ALL_REWRITTEN
    assert all(hasattr(model.get_submodule(a), "to_qkv") for a in ATTENTIONS)
    x = {k: v.cuda() for k, v in inputs(torch.bfloat16).items()}
    x["encoder_attention_mask"] = torch.tensor([[1] * real + [0] * (8 - real)], device="cuda")
    a, b = run(plain, x), run(model, x)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > 0.999, cos
