"""diffgen_cuda.qwen_image: fused Q/K/V in Qwen-Image's attention, and its block with prepared inputs.

As for FLUX.1 (test_flux1_rewrites.py, whose reasoning holds here): on the CPU the prepared inputs
come from Fp8ScaledMMMethod's PyTorch producers, the very ops of diffusers' block, so the rewritten
block must give diffusers' numbers bit for bit. Fusing Q/K/V changes only the fp32 summation order,
so the fused attention is compared with the unfused one to rounding.
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
from diffgen_cuda import qwen_image

from test_flux1_rewrites import CPU, CountingProducers, assert_same_output, bf16, needs_cpu_scaled_mm, run

ATTENTION, BLOCK = "transformer_blocks.0.attn", "transformer_blocks.0"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_transformer("qwen_image", tmp_path_factory.mktemp("qwen") / "transformer", seed=0,
                                 dtype=torch.float32)


@pytest.fixture(scope="module")
def inputs():
    return bf16(tiny_transformer_inputs("qwen_image", tiny_transformer("qwen_image", seed=0), seed=1))


def load(path, **kwargs):
    model = diffgen.load_transformer(path, device="cpu", dtype=torch.bfloat16, rewrites=False, **kwargs)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.method = CountingProducers(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    return model


@needs_cpu_scaled_mm
def test_fused_attention_matches_diffusers_unfused(qwen_dir, inputs):
    unfused, fused = load(qwen_dir, quantization="fp8"), load(qwen_dir, quantization="fp8")
    assert apply_rewrites(fused, [qwen_image.FuseQwenAttentionQKV()], CPU) == {ATTENTION: "qwen-image-fused-qkv"}
    attn = fused.get_submodule(ATTENTION)
    assert not hasattr(attn, "to_q") and attn.to_qkv.out_features == 3 * attn.inner_dim
    assert type(attn.processor).__name__ == "FusedQwenAttnProcessor"
    assert_same_output(unfused, fused, inputs)


def test_16bit_projections_stay_apart(qwen_dir):
    model = load(qwen_dir, quantization="fp8", quantization_ignored_layers=[f"{ATTENTION}.to_k"])
    declined = {}
    assert apply_rewrites(model, [qwen_image.FuseQwenAttentionQKV()], CPU, declined=declined) == {}
    assert "16-bit" in declined[ATTENTION][1]


@needs_cpu_scaled_mm
@pytest.mark.parametrize("fuse", [True, False])
def test_rewritten_block_gives_diffusers_numbers(qwen_dir, inputs, fuse):
    model = load(qwen_dir, quantization="fp8")
    if fuse:
        apply_rewrites(model, [qwen_image.FuseQwenAttentionQKV()], CPU)
    done = assert_rewrites_exact(model, inputs, [qwen_image.QwenImageBlock()], CPU, run=run)
    assert list(done) == [BLOCK]
    CountingProducers.calls.clear()
    run(model, inputs)
    # Q/K/V of each stream from one norm pass each, and one per MLP; GELU feeds both MLPs' second linear.
    assert CountingProducers.calls == Counter(norm_modulate=4, gelu_concat=2)
    undo_rewrites(model)


@needs_cpu_scaled_mm
def test_per_token_modulation_and_text_mask(qwen_dir, inputs):
    """zero_cond_t models modulate image tokens per token (modulate_index): that norm stays 16-bit; a
    text mask with padding reaches attention. Both as diffusers computes them."""
    model = load(qwen_dir, quantization="fp8")
    apply_rewrites(model, [qwen_image.FuseQwenAttentionQKV()], CPU)
    block = model.get_submodule(BLOCK)
    g = torch.Generator().manual_seed(5)
    dim = block.dim
    x = torch.randn(1, 16, dim, generator=g).bfloat16()
    text = torch.randn(1, 8, dim, generator=g).bfloat16()
    mask = torch.tensor([[1] * 6 + [0] * 2], dtype=torch.bool)
    temb = torch.randn(2, dim, generator=g).bfloat16()
    index = torch.tensor([[0] * 10 + [1] * 6], dtype=torch.int)
    rope = model.pos_embed([(1, 4, 4)], max_txt_seq_len=8, device=torch.device("cpu"))
    block.zero_cond_t = True
    args = dict(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask, temb=temb,
                image_rotary_emb=rope, modulate_index=index)
    with torch.no_grad():
        stock = block(**args)
        assert apply_rewrites(model, [qwen_image.QwenImageBlock()], CPU) == {BLOCK: "qwen-image-block"}
        rewritten = block(**args)
    for a, b in zip(stock, rewritten):
        assert torch.equal(a, b)


def test_a_mask_that_masks_nothing_is_dropped_and_any_other_is_kept(qwen_dir, inputs, monkeypatch):
    import diffusers.models.transformers.transformer_qwenimage as qwen

    model = load(qwen_dir)
    seen = []
    original = qwen.QwenImageTransformerBlock.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs["encoder_hidden_states_mask"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(qwen.QwenImageTransformerBlock, "forward", spy)
    stock = run(model, inputs)
    assert apply_rewrites(model, [qwen_image.DropFullTextMask()], CPU) == {"": "qwen-image-full-mask-dropped"}
    seen.clear()
    dropped = run(model, inputs)
    assert seen == [None]
    # the same attention without the mask: equal up to the backends' rounding
    assert torch.allclose(dropped, stock, rtol=1e-2, atol=1e-2 * stock.abs().max().item())
    partial = dict(inputs, encoder_hidden_states_mask=torch.tensor([[1] * 6 + [0] * 2]))
    seen.clear()
    kept = run(model, partial)
    assert seen[0] is not None
    undo_rewrites(model)
    assert torch.equal(kept, run(model, partial))


def test_installed_plugin_publishes_the_rewrites(qwen_dir):
    from diffgen.plugins import get_plugin_host

    host = get_plugin_host()
    if host.plugins["cuda"].distribution != "diffgen-cuda":
        pytest.skip("diffgen-cuda is not installed (registered from the source tree): no entry points")
    published = [type(r) for r in host.rewrites()]
    assert [t for t in published if t.__module__ == qwen_image.__name__] == [type(r) for r in qwen_image.REWRITES]
    report = diffgen.inspect(qwen_dir, quantization="fp8")
    assert {r["rewrite"]: r["modules"] for r in report["rewrites"]} == \
        {"qwen-image-fused-qkv": 1, "qwen-image-block": 1, "qwen-image-full-mask-dropped": 1}
