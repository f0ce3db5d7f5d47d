"""diffgen.fused_blocks: eager FLUX.1 blocks that feed quantized linears from fused producers.

On the CPU the producers are Fp8ScaledMMMethod's PyTorch references (torch._scaled_mm runs on the
CPU), which are the very ops of diffusers' blocks. So a rewritten model must give diffusers' own
forward's numbers bit for bit, with the same layers: any slip in the rewrite's wiring (an
operand, a gate, the text/image order) shows. The Triton producers that replace these on CUDA are
tested against the same references in plugins/diffgen-cuda/tests/test_fused_gpu.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.builtin.fp8 import Fp8ScaledMMMethod
from diffgen.fused_blocks import fuse_blocks, qk_norm_rope, unfuse_blocks
from diffgen.fusion import fuse_projections
from diffgen.linear import QuantLinear
from tests.conftest import run
from tests.test_fp8 import WEIGHTS, write_fp8_checkpoint

BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0"]


@pytest.fixture(scope="module")
def inputs(flux_inputs):
    return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in flux_inputs.items()}


class CountingProducers(Fp8ScaledMMMethod):
    """The reference producers, declared fusable, counting their calls; the attention prologue is
    diffusers' ops (fused_blocks.qk_norm_rope) offered as the method's, or declined (None)."""

    fuses_producers = True
    calls: Counter = Counter()
    decline_prologue = False

    def qk_norm_rope(self, *args):
        self.calls["qk_norm_rope"] += 1
        return None if self.decline_prologue else qk_norm_rope(*args)

    def quantize_norm_modulate(self, *args):
        self.calls["norm_modulate"] += 1
        return super().quantize_norm_modulate(*args)

    def quantize_gelu_concat(self, *args):
        self.calls["gelu_concat"] += 1
        return super().quantize_gelu_concat(*args)


def load(path, **kwargs):
    """A bf16 model whose quantized linears run CountingProducers, Q/K/V fused, blocks not rewritten."""
    model = diffgen.load_transformer(path, dtype=torch.bfloat16, fuse_projections=False, **kwargs)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.method = CountingProducers(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    assert fuse_projections(model) == [f"{b}.attn" for b in BLOCKS]
    return model


def assert_rewrite_is_exact(model, inputs, expected_calls):
    stock = run(model, inputs)
    assert fuse_blocks(model) == BLOCKS
    CountingProducers.calls.clear()
    fused = run(model, inputs)
    assert CountingProducers.calls == expected_calls  # the producers did run
    assert torch.equal(fused, stock)
    unfuse_blocks(model)
    assert torch.equal(run(model, inputs), stock)


def test_rewritten_blocks_give_diffusers_numbers_dynamic(flux_dir, inputs):
    model = load(flux_dir, quantization="fp8")
    # Double block: Q/K/V, added Q/K/V and both feed-forwards' first linears; single: one norm for Q/K/V and
    # proj_mlp. GELU feeds ff.net.2 and ff_context.net.2, and the single block's proj_out with the attention.
    assert_rewrite_is_exact(model, inputs, Counter(norm_modulate=5, gelu_concat=3, qk_norm_rope=2))


def test_rewritten_blocks_give_diffusers_numbers_static(flux_dir, inputs, tmp_path):
    model = load(write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor", "static"))
    assert_rewrite_is_exact(model, inputs, Counter(norm_modulate=5, gelu_concat=3, qk_norm_rope=2))


def test_a_declined_prologue_runs_diffusers_ops(flux_dir, inputs, monkeypatch):
    monkeypatch.setattr(CountingProducers, "decline_prologue", True)
    model = load(flux_dir, quantization="fp8")
    assert_rewrite_is_exact(model, inputs, Counter(norm_modulate=5, gelu_concat=3, qk_norm_rope=2))


def test_16bit_linears_get_the_bf16_value(flux_dir, inputs):
    """An ignore list keeps proj_mlp and one ff.net.2 in bf16: the norm pass also writes its bf16 output
    for proj_mlp, and ff.net.2 gets plain GELU."""
    model = load(flux_dir, quantization="fp8", quantization_ignored_layers=[
        "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2"])
    assert type(model.get_submodule("single_transformer_blocks.0.proj_mlp")) is torch.nn.Linear
    assert_rewrite_is_exact(model, inputs, Counter(norm_modulate=5, gelu_concat=2, qk_norm_rope=2))


def test_unequal_static_scales_on_one_input_leave_the_block_alone(flux_dir, inputs, tmp_path):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor", "static")
    tensors = load_file(ckpt / WEIGHTS)
    tensors["single_transformer_blocks.0.proj_mlp.input_scale"] = torch.tensor(5.0 / 448)
    save_file(tensors, ckpt / WEIGHTS)
    model = load(ckpt)
    assert fuse_blocks(model) == ["transformer_blocks.0"]


def test_batch_of_two_and_attention_kwargs(flux_dir):
    """Two samples take their own modulation rows; joint_attention_kwargs (IP-Adapter, masks) make
    the blocks fall back to diffusers' forward."""
    from diffgen.testing.tiny_transformers import tiny_transformer, tiny_transformer_inputs

    batch = tiny_transformer_inputs("flux1", tiny_transformer("flux1", seed=0), seed=2, batch=2)
    batch = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    model = load(flux_dir, quantization="fp8")
    assert_rewrite_is_exact(model, batch, Counter(norm_modulate=5, gelu_concat=3, qk_norm_rope=2))
    fuse_blocks(model)
    CountingProducers.calls.clear()
    stock = run(model, {**batch, "joint_attention_kwargs": {"attention_mask": None}})
    assert not CountingProducers.calls
    unfuse_blocks(model)
    assert torch.equal(stock, run(model, batch))


def test_compiled_blocks_trace_the_rewritten_forward(flux_dir, inputs):
    """Under torch.compile the rewritten forward is traced in one graph per block, producers included."""
    model = load(flux_dir, quantization="fp8")
    stock = run(model, inputs)
    fuse_blocks(model)
    for name in BLOCKS:
        model.get_submodule(name).compile(backend="eager", fullgraph=True)
    CountingProducers.calls.clear()
    try:
        assert torch.equal(run(model, inputs), stock)
        assert CountingProducers.calls == Counter(norm_modulate=5, gelu_concat=3, qk_norm_rope=2)  # counted while tracing
    finally:
        torch._dynamo.reset()


def test_loader_rewrites_only_for_methods_that_fuse_producers(flux_dir):
    # On the CPU the fp8 family runs its reference method, which takes no quantized input.
    model = diffgen.load_transformer(flux_dir, quantization="fp8", dtype=torch.bfloat16)
    assert model.diffgen_fused_projections == [f"{b}.attn" for b in BLOCKS]
    assert model.diffgen_fused_blocks == []
