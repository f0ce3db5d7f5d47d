"""Q/K/V fusion after loading: exact where it happens, refused where it would change the numbers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.linear import QuantLinear
from tests.conftest import run
from tests.test_fp8 import WEIGHTS, reference_linear, write_fp8_checkpoint

ATTENTIONS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]


def assert_same_output(a, b, inputs):
    ya, yb = run(a, inputs), run(b, inputs)
    # The same dot products; only the fp32 matmul's summation order may differ.
    assert torch.allclose(ya, yb, rtol=1e-5, atol=1e-5 * yb.abs().max().item())


def test_online_fp8_fuses_qkv_exactly(flux_dir, flux_inputs):
    fused = diffgen.load_transformer(flux_dir, quantization="fp8", dtype=torch.float32)
    plain = diffgen.load_transformer(flux_dir, quantization="fp8", dtype=torch.float32, fuse_projections=False)
    assert fused.diffgen_fused_projections == ATTENTIONS and plain.diffgen_fused_projections == []
    double = fused.get_submodule("transformer_blocks.0.attn")
    assert double.fused_projections and isinstance(double.to_qkv, QuantLinear)
    assert isinstance(double.to_added_qkv, QuantLinear)
    assert not hasattr(double, "to_q") and not hasattr(double, "add_q_proj")  # no weight held twice
    single = fused.get_submodule("single_transformer_blocks.0.attn")
    assert single.to_qkv.out_features == 3 * plain.get_submodule("single_transformer_blocks.0.attn.to_q").out_features
    assert_same_output(fused, plain, flux_inputs)


def test_static_scales_fuse_with_per_channel_weight_scales(flux_dir, flux_inputs, tmp_path):
    """ModelOpt-style: per-tensor weight scales that differ per projection, one input scale."""
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor", "static")
    fused = diffgen.load_transformer(ckpt, dtype=torch.float32)
    plain = diffgen.load_transformer(ckpt, dtype=torch.float32, fuse_projections=False)
    assert fused.diffgen_fused_projections == ATTENTIONS
    qkv = fused.get_submodule("transformer_blocks.0.attn.to_qkv")
    assert qkv.method.scheme == "per-channel" and qkv.weight_scale.shape == (qkv.out_features,)
    parts = [plain.get_submodule(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"]
    assert torch.equal(qkv.weight_scale, torch.cat([p.weight_scale.reshape(1).expand(p.out_features) for p in parts]))
    x = torch.randn(7, qkv.in_features) * 3
    assert torch.allclose(qkv(x), reference_linear(qkv, x, "per-channel", "static"), rtol=1e-5, atol=1e-5)
    assert torch.allclose(qkv(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-5, atol=1e-5)
    assert_same_output(fused, plain, flux_inputs)


def test_unequal_input_scales_block_scales_and_16bit_parts_are_not_fused(flux_dir, tmp_path):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor", "static")
    tensors = load_file(ckpt / WEIGHTS)
    tensors["transformer_blocks.0.attn.to_k.input_scale"] = torch.tensor(5.0 / 448)
    save_file(tensors, ckpt / WEIGHTS)
    model = diffgen.load_transformer(ckpt, dtype=torch.float32)
    assert model.diffgen_fused_projections == ["single_transformer_blocks.0.attn"]
    assert isinstance(model.get_submodule("transformer_blocks.0.attn.to_k"), QuantLinear)

    block = write_fp8_checkpoint(flux_dir, tmp_path / "block", "block")
    assert diffgen.load_transformer(block, dtype=torch.float32).diffgen_fused_projections == []

    partial = diffgen.load_transformer(flux_dir, quantization="fp8", dtype=torch.float32,
                                       quantization_ignored_layers=["transformer_blocks.0.attn.add_v_proj"])
    assert partial.diffgen_fused_projections == ["single_transformer_blocks.0.attn"]
    assert type(partial.get_submodule("transformer_blocks.0.attn.add_v_proj")) is torch.nn.Linear
