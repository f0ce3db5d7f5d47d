"""diffgen_cuda.wan: fused projections in Wan's attention (self: Q/K/V; cross: K/V). Fusion changes only the fp32 summation order of the same dot products, so a fused
model matches the unfused one to rounding; diffusers' own processor reads the fused layers. The
feed-forward's GELU producer gives diffusers' numbers bit for bit."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import diffgen
from diffgen.linear import QuantLinear
from diffgen.rewrites import apply_rewrites, undo_rewrites
from diffgen.testing.rewrites import assert_rewrites_exact
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs
from diffgen_cuda import wan

from test_flux1_rewrites import (CPU, CountingProducers, assert_same_output, bf16, load_counting, needs_cpu_scaled_mm,
                                 run)


def _load(path, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=torch.float32, rewrites=False, **kwargs)


@pytest.mark.parametrize("family", ["wan", "wan_ti2v"])
def test_fused_projections_give_the_unfused_numbers(family, tmp_path):
    path = save_tiny_transformer(family, tmp_path / family, seed=0, dtype=torch.float32)
    inputs = tiny_transformer_inputs(family, tiny_transformer(family, seed=0), seed=1)
    unfused, fused = _load(path, quantization="fp8"), _load(path, quantization="fp8")
    done = apply_rewrites(fused, wan.REWRITES, CPU)
    assert set(done) == {"blocks.0.attn1", "blocks.0.attn2"}
    self_attn, cross = fused.get_submodule("blocks.0.attn1"), fused.get_submodule("blocks.0.attn2")
    assert isinstance(self_attn.to_qkv, QuantLinear) and not hasattr(self_attn, "to_q")
    assert isinstance(cross.to_kv, QuantLinear) and isinstance(cross.to_q, QuantLinear)
    assert not hasattr(cross, "to_added_kv")  # Wan2.2 has no image context (Wan2.1 I2V's add_k/v_proj)
    assert_same_output(unfused, fused, inputs)


def test_16bit_projections_are_left_alone(tmp_path):
    path = save_tiny_transformer("wan", tmp_path / "wan", seed=0, dtype=torch.float32)
    model = _load(path, quantization="fp8", quantization_ignored_layers=["blocks.0.attn1.to_v"])
    declined = {}
    assert apply_rewrites(model, wan.REWRITES, CPU, declined=declined) == {"blocks.0.attn2": "wan-fused-projections"}
    assert "16-bit" in declined["blocks.0.attn1"][1]


def test_the_reference_method_leaves_the_feed_forward_alone(tmp_path):
    """On the CPU the fp8 reference takes no prepared input: the GELU producer would gain nothing."""
    path = save_tiny_transformer("wan", tmp_path / "wan", seed=0, dtype=torch.float32)
    declined = {}
    done = apply_rewrites(_load(path, quantization="fp8"), wan.REWRITES, CPU, declined=declined)
    assert "blocks.0" not in done and "prepared input" in declined["blocks.0"][1]


@needs_cpu_scaled_mm
@pytest.mark.parametrize("family", ["wan", "wan_ti2v"])
def test_the_gelu_producer_gives_diffusers_numbers(family, tmp_path):
    """With methods that take prepared inputs (the PyTorch producers, counted), the feed-forward's
    GELU goes to the down projection as its prepared input, and the block's output is diffusers'
    bit for bit (both modulation layouts: Wan2.2 A14B's per sample, TI2V's per token); with the
    feed-forward in training mode the block calls it as diffusers does (its dropout)."""
    path = save_tiny_transformer(family, tmp_path / family, seed=0, dtype=torch.float32)
    inputs = bf16(tiny_transformer_inputs(family, tiny_transformer(family, seed=0), seed=1))
    model = load_counting(path, quantization="fp8")
    done = assert_rewrites_exact(model, inputs, [wan.WanGeluProducer()], CPU, run=run)
    assert done == {"blocks.0": "wan-gelu-producer"}
    CountingProducers.calls.clear()
    run(model, inputs)
    assert CountingProducers.calls == Counter(gelu_concat=1)
    CountingProducers.calls.clear()
    model.get_submodule("blocks.0.ffn").train()  # dropout (0 here): diffusers' feed-forward, same numbers
    assert torch.equal(run(model, inputs), run(undone(model), inputs)) and CountingProducers.calls == Counter()


def undone(model):
    undo_rewrites(model)
    return model


def test_a_16bit_down_projection_leaves_the_feed_forward_alone(tmp_path):
    path = save_tiny_transformer("wan", tmp_path / "wan", seed=0, dtype=torch.float32)
    model = load_counting(path, quantization="fp8", quantization_ignored_layers=["blocks.0.ffn.net.2"])
    declined = {}
    assert apply_rewrites(model, [wan.WanGeluProducer()], CPU, declined=declined) == {}
    assert "prepared input" in declined["blocks.0"][1]


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["wan", "wan_ti2v"])
def test_rewritten_wan_on_gpu(family, tmp_path):
    """On an SM89+ GPU the Triton FP8 method takes prepared inputs: the block is rewritten, its
    GELU goes through the Triton producer, and the model agrees with FP8 in diffusers' blocks
    to FP8 rounding (test_producers_gpu.py checks the producer's codes against PyTorch's GELU and
    quantization), eager and with the block compiled."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = save_tiny_transformer(family, tmp_path / family, seed=0, dtype=torch.bfloat16)
    load = dict(quantization="fp8", device="cuda", dtype=torch.bfloat16)
    plain = diffgen.load_transformer(path, rewrites=False, **load)
    model = diffgen.load_transformer(path, **load)
    assert model.diffgen_rewrites == {"blocks.0.attn1": "wan-fused-projections",
                                      "blocks.0.attn2": "wan-fused-projections", "blocks.0": "wan-gelu-producer"}
    x = {k: v.cuda() for k, v in bf16(tiny_transformer_inputs(family, plain, seed=1)).items()}
    block = model.get_submodule("blocks.0")
    try:
        stock, eager = run(plain, x), run(model, x)
        block.compile(fullgraph=True)
        compiled = run(model, x)
    finally:
        block._compiled_call_impl = None
        torch._dynamo.reset()
    for out in (eager, compiled):
        cos = torch.nn.functional.cosine_similarity(out.flatten(), stock.flatten(), dim=0).item()
        assert cos > 0.9995, cos
