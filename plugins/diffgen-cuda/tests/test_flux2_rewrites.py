"""diffgen_cuda.flux2: fused Q/K/V in FLUX.2's double blocks, and its blocks with prepared inputs.

As for FLUX.1 (test_flux1_rewrites.py, whose reasoning holds here): on the CPU the prepared inputs
come from Fp8ScaledMMMethod's PyTorch producers (and, for SwiGLU, flux2's PyTorch ops followed by
the method's own quantization), the very ops of diffusers' blocks, so a rewritten block must give
diffusers' numbers bit for bit; any slip in the wiring (an operand, a gate, the text/image order,
the Q/K/V : MLP split) shows. The rewritten forwards are also forced onto 16-bit blocks (which the
rewrite itself leaves alone: nothing to prepare) to prove them bit-exact in fp32 and bf16 with
plain nn.Linear. Fusing Q/K/V changes only the fp32 summation order, so the fused attention is
compared with the unfused one to rounding.
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
from diffgen_cuda import block_rewrite, flux2

from test_flux1_rewrites import CPU, CountingProducers, assert_same_output, bf16, needs_cpu_scaled_mm, run, \
    static_fp8_checkpoint

ATTENTION = "transformer_blocks.0.attn"
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0"]
BLOCK_REWRITES = flux2.REWRITES[1:]
# Double block: one norm pass for the image Q/K/V, one for the text's, one per feed-forward; single
# block: one for to_qkv_mlp_proj. SwiGLU feeds both feed-forwards' linear_out and the single block's to_out.
ALL_CALLS = Counter(norm_modulate=5, swiglu_concat=3)


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    return save_tiny_transformer("flux2", tmp_path_factory.mktemp("flux2") / "transformer", seed=0,
                                 dtype=torch.float32)


@pytest.fixture(scope="module")
def inputs():
    return tiny_transformer_inputs("flux2", tiny_transformer("flux2", seed=0), seed=1)


@pytest.fixture
def counted(monkeypatch):
    """CountingProducers' calls, with the SwiGLU preparation counted too."""
    original = block_rewrite.prepare_swiglu_concat

    def counting(*args):
        CountingProducers.calls["swiglu_concat"] += 1
        return original(*args)

    monkeypatch.setattr(block_rewrite, "prepare_swiglu_concat", counting)
    CountingProducers.calls.clear()
    return CountingProducers.calls


def load(path, *, fuse=True, **kwargs):
    """A bf16 model whose quantized linears run CountingProducers; Q/K/V fused when ``fuse``."""
    model = diffgen.load_transformer(path, device="cpu", dtype=torch.bfloat16, rewrites=False, **kwargs)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.method = CountingProducers(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    if fuse:
        assert apply_rewrites(model, [flux2.FuseFlux2AttentionQKV()], CPU) == {ATTENTION: "flux2-fused-qkv"}
    return model


def assert_blocks_exact(model, x, calls, expected_calls):
    done = assert_rewrites_exact(model, x, BLOCK_REWRITES, CPU, run=run)
    assert list(done) == BLOCKS
    calls.clear()
    run(model, x)
    assert calls == expected_calls  # the producers did run
    undo_rewrites(model)


# -- Q/K/V fusion ----------------------------------------------------------------------------
def test_loading_fuses_qkv_exactly(flux2_dir, inputs):
    fused = diffgen.load_transformer(flux2_dir, quantization="fp8", device="cpu", dtype=torch.float32)
    plain = diffgen.load_transformer(flux2_dir, quantization="fp8", device="cpu", dtype=torch.float32,
                                     rewrites=False)
    # On the CPU the fp8 reference runs: it fuses, but takes no prepared input, so no block is rewritten.
    assert fused.diffgen_rewrites == {ATTENTION: "flux2-fused-qkv"}
    attn = fused.get_submodule(ATTENTION)
    assert attn.fused_projections and isinstance(attn.to_qkv, QuantLinear) and isinstance(attn.to_added_qkv, QuantLinear)
    assert not hasattr(attn, "to_q") and not hasattr(attn, "add_v_proj")  # no weight held twice
    assert attn.to_qkv.out_features == 3 * attn.inner_dim
    assert_same_output(fused, plain, inputs)


def test_16bit_projections_and_methods_without_prepared_inputs(flux2_dir):
    partial = diffgen.load_transformer(flux2_dir, quantization="fp8", device="cpu", dtype=torch.bfloat16,
                                       quantization_ignored_layers=[f"{ATTENTION}.add_k_proj"])
    assert partial.diffgen_rewrites == {}
    declined = {}
    model = diffgen.load_transformer(flux2_dir, quantization="fp8", device="cpu", dtype=torch.bfloat16, rewrites=False)
    assert apply_rewrites(model, flux2.REWRITES, CPU, declined=declined) == {ATTENTION: "flux2-fused-qkv"}
    assert all("prepared input" in declined[b][1] for b in BLOCKS)


# -- the rewritten forwards in 16 bits -------------------------------------------------------
class _Forced:
    """The block rewrite applied to 16-bit blocks (which it declines: nothing to prepare)."""

    def rewrite(self, block, platform):
        if not self.expected(block):
            return "unexpected"
        block.diffgen_qk_norm_rope = block.diffgen_swiglu = None
        return None


class ForcedDouble(_Forced, flux2.Flux2DoubleBlock):
    pass


class ForcedSingle(_Forced, flux2.Flux2SingleBlock):
    pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_rewritten_forwards_are_diffusers_forwards_in_16bit(flux2_dir, dtype, batch):
    model = diffgen.load_transformer(flux2_dir, device="cpu", dtype=dtype, rewrites=False)
    x = tiny_transformer_inputs("flux2", tiny_transformer("flux2", seed=0), seed=2, batch=batch)
    x = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    assert list(assert_rewrites_exact(model, x, [ForcedDouble(), ForcedSingle()], CPU, run=run)) == BLOCKS
    undo_rewrites(model)


# -- blocks with prepared inputs -------------------------------------------------------------
@needs_cpu_scaled_mm
@pytest.mark.parametrize("fuse", [True, False])
def test_rewritten_blocks_give_diffusers_numbers_dynamic(flux2_dir, inputs, counted, fuse):
    assert_blocks_exact(load(flux2_dir, fuse=fuse, quantization="fp8"), bf16(inputs), counted, ALL_CALLS)


@needs_cpu_scaled_mm
@pytest.mark.parametrize("fuse", [True, False])
def test_rewritten_blocks_give_diffusers_numbers_static(flux2_dir, inputs, counted, tmp_path, fuse):
    model = load(static_fp8_checkpoint(flux2_dir, tmp_path / "fp8"), fuse=fuse)
    assert model.get_submodule("single_transformer_blocks.0.attn.to_out").method.static
    assert_blocks_exact(model, bf16(inputs), counted, ALL_CALLS)


@needs_cpu_scaled_mm
def test_16bit_linears_get_the_16bit_value(flux2_dir, inputs, counted):
    """An ignore list keeps one linear_in and the single block's to_out in bf16: the norm pass writes
    its bf16 output for the one, and the other gets the plain SwiGLU + concat."""
    model = load(flux2_dir, quantization="fp8", quantization_ignored_layers=[
        "transformer_blocks.0.ff_context.linear_in", "single_transformer_blocks.0.attn.to_out"])
    assert type(model.get_submodule("single_transformer_blocks.0.attn.to_out")) is torch.nn.Linear
    assert_blocks_exact(model, bf16(inputs), counted, Counter(norm_modulate=4, swiglu_concat=2))


class OwnSwiGLU(CountingProducers):
    """A method that prepares SwiGLU itself (``prepare_swiglu_concat``), the PyTorch way."""

    def prepare_swiglu_concat(self, layer, a, h):
        self.calls["own_swiglu_concat"] += 1
        y = block_rewrite.swiglu_concat(a, h)
        return self.quantize_input(layer, y.reshape(-1, y.shape[-1]))


@needs_cpu_scaled_mm
def test_a_methods_own_swiglu_preparation_is_used(flux2_dir, inputs, counted):
    model = load(flux2_dir, quantization="fp8")
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.method = OwnSwiGLU(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    assert_blocks_exact(model, bf16(inputs), counted, ALL_CALLS + Counter(own_swiglu_concat=3))


def test_unequal_static_scales_on_one_input_leave_the_block_alone(flux2_dir, tmp_path):
    ckpt = static_fp8_checkpoint(flux2_dir, tmp_path / "fp8", {f"{ATTENTION}.to_k": 5.0 / 448})
    model = load(ckpt, fuse=False)
    declined = {}
    assert apply_rewrites(model, flux2.REWRITES, CPU, declined=declined) == {BLOCKS[1]: "flux2-single-block"}
    assert "static scales" in declined[BLOCKS[0]][1]
    assert "cannot fuse" in declined[ATTENTION][1]


@needs_cpu_scaled_mm
def test_batch_of_two_and_attention_kwargs(flux2_dir, counted):
    """Two samples take their own modulation rows; joint_attention_kwargs (klein's KV cache, masks)
    make the blocks run diffusers' forward."""
    batch = bf16(tiny_transformer_inputs("flux2", tiny_transformer("flux2", seed=0), seed=2, batch=2))
    model = load(flux2_dir, quantization="fp8")
    assert_blocks_exact(model, batch, counted, ALL_CALLS)
    apply_rewrites(model, BLOCK_REWRITES, CPU)
    counted.clear()
    stock = run(model, {**batch, "joint_attention_kwargs": {"attention_mask": None}})
    assert not counted
    undo_rewrites(model)
    assert torch.equal(stock, run(model, batch))


@needs_cpu_scaled_mm
def test_per_token_modulation_runs_diffusers_forward(flux2_dir, counted):
    """KV extract mode blends the modulation per token ([B, S, 3D]); the producers take [B, D]."""
    model = load(flux2_dir, quantization="fp8")
    block = model.get_submodule(BLOCKS[1])
    g = torch.Generator().manual_seed(3)
    dim = block.norm.normalized_shape[0]
    args = dict(hidden_states=torch.randn(1, 12, dim, generator=g).bfloat16(), encoder_hidden_states=None,
                temb_mod=torch.randn(1, 12, 3 * dim, generator=g).bfloat16())
    with torch.no_grad():
        stock = block(**args)
        assert apply_rewrites(model, [flux2.Flux2SingleBlock()], CPU) == {BLOCKS[1]: "flux2-single-block"}
        counted.clear()
        assert torch.equal(block(**args), stock)
        assert not counted
        # the same block with a per-sample modulation and split outputs does run rewritten, exactly
        args["temb_mod"] = args["temb_mod"][:, :1]
        rewritten = block(**args, split_hidden_states=True, text_seq_len=4)
        assert counted == Counter(norm_modulate=1, swiglu_concat=1)
        undo_rewrites(model)
        for a, b in zip(rewritten, block(**args, split_hidden_states=True, text_seq_len=4)):
            assert torch.equal(a, b)


@needs_cpu_scaled_mm
def test_compiled_blocks_trace_the_rewritten_forward(flux2_dir, inputs, counted):
    """Under torch.compile the rewritten forward is traced in one graph per block, producers included."""
    model, x = load(flux2_dir, quantization="fp8"), bf16(inputs)
    stock = run(model, x)
    apply_rewrites(model, BLOCK_REWRITES, CPU)
    for name in BLOCKS:
        model.get_submodule(name).compile(backend="eager", fullgraph=True)
    counted.clear()
    try:
        assert torch.equal(run(model, x), stock)
        assert counted == ALL_CALLS  # counted while tracing
    finally:
        torch._dynamo.reset()


def test_swiglu_concat_is_diffusers_swiglu():
    from diffusers.models.transformers.transformer_flux2 import Flux2SwiGLU

    g = torch.Generator().manual_seed(0)
    h, a = torch.randn(3, 5, 32, generator=g).bfloat16(), torch.randn(3, 5, 8, generator=g).bfloat16()
    assert torch.equal(block_rewrite.swiglu_concat(None, h), Flux2SwiGLU()(h))
    # silu(g) * u from its definition, in fp32 then rounded: bf16 rounds silu's output first, so allow one bf16 step
    want = (h[..., :16].float() * torch.sigmoid(h[..., :16].float()) * h[..., 16:].float())
    got = block_rewrite.swiglu_concat(a, h)
    assert torch.equal(got[..., :8], a)
    assert torch.allclose(got[..., 8:].float(), want, rtol=2 ** -7, atol=1e-6)


def test_installed_plugin_publishes_the_rewrites(flux2_dir):
    from diffgen.plugins import get_plugin_host

    host = get_plugin_host()
    if host.plugins["cuda"].distribution != "diffgen-cuda":
        pytest.skip("diffgen-cuda is not installed (registered from the source tree): no entry points")
    published = [type(r) for r in host.rewrites()]
    assert [t for t in published if t.__module__ == flux2.__name__] == [type(r) for r in flux2.REWRITES]
    report = diffgen.inspect(flux2_dir, quantization="fp8")
    # inspect plans for the native method (the Triton one on a GPU), which takes prepared inputs
    assert {r["rewrite"]: r["modules"] for r in report["rewrites"]} == \
        {"flux2-fused-qkv": 1, "flux2-double-block": 1, "flux2-single-block": 1}
