"""diffgen_cuda.wan: fused projections in Wan's attention (self: Q/K/V; cross: K/V). Fusion changes only the fp32 summation order of the same dot products, so a fused
model matches the unfused one to rounding; diffusers' own processor reads the fused layers."""

from __future__ import annotations

import pytest
import torch

import diffgen
from diffgen.linear import QuantLinear
from diffgen.rewrites import apply_rewrites
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs
from diffgen_cuda import wan

from test_flux1_rewrites import CPU, assert_same_output


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
