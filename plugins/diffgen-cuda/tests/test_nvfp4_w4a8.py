"""nvfp4_w4a8 and the weight-only nvfp4-triton-dequant: the per-row quantities the methods prepare,
and their fusion, checked on the CPU against the format's definition (diffgen.numerics.nvfp4); the
kernel calls themselves on a CUDA GPU (SM89+): fused Q/K/V against the parts, and each method
inside diffgen-cuda's rewritten FLUX.1 blocks against the same method in diffusers' blocks."""

from __future__ import annotations

import pytest
import torch

from diffgen.linear import QuantLinear
from diffgen.numerics.e2m1 import E2M1_MAX, unpack_e2m1, e2m1_to_float
from diffgen.numerics.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from diffgen.quant import LayerSpec, QuantConfig
from diffgen_cuda.nvfp4 import Nvfp4TritonDequantMethod
from diffgen_cuda.nvfp4_w4a8 import Nvfp4TritonW4A8Method

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU of SM89+ with Triton")


METHODS = [Nvfp4TritonW4A8Method, Nvfp4TritonDequantMethod]


def _layers(n_parts=3, n=64, k=96, device="cpu", bias=True, method=Nvfp4TritonW4A8Method):
    """Q/K/V-like layers of one input, each with its own global scale (weights of different size)."""
    config = QuantConfig.make("nvfp4", scheme="w4a16")
    g = torch.Generator().manual_seed(0)
    layers, weights = [], []
    for i in range(n_parts):
        spec = LayerSpec(f"attn.to_{'qkv'[i]}", k, n, bias, torch.bfloat16)
        w = torch.randn(n, k, generator=g) * (i + 1) ** 2
        with torch.device(device):
            layer = QuantLinear(spec, method(config, spec, unavailable_reason=None if device == "cuda"
                                             else "CPU: no kernels"), dtype=torch.bfloat16)
        packed, scale, global_scale = quantize_nvfp4(w)
        layer.weight.data, layer.weight_scale.data = packed.to(device), scale.to(device)
        layer.weight_scale_2.data = global_scale.to(device)
        if bias:
            layer.bias.data = torch.randn(n, generator=g).bfloat16().to(device)
        layer.method.process_weights_after_loading(layer)
        layers.append(layer)
        weights.append(dequantize_nvfp4(packed, scale, global_scale, k=k))
    return layers, weights


def _per_row_dequantized(layer) -> torch.Tensor:
    """code * block scale * the row's global scale, from the layer's own tensors."""
    codes = e2m1_to_float(unpack_e2m1(layer.weight.data.cpu()))
    blocks = layer.weight_scale.data.cpu().float().repeat_interleave(16, dim=1)
    return (codes * blocks * layer._row_global.cpu()[:, None])[:, : layer.in_features]


def test_row_scales_fit_every_value_of_their_row():
    layers, weights = _layers()
    for layer, w in zip(layers, weights):
        assert torch.equal(_per_row_dequantized(layer), w)
        # W8 = W / row must stay inside E4M3's range: |W| <= 6 * max block scale * global = row * 448
        row = layer._w8_scale.reshape(-1)
        assert (w.abs().amax(dim=1) <= row * 448 * (1 + 1e-6)).all()
        assert torch.allclose(layer._w8_factor, layer._row_global / row)
        expected_row = layer.weight_scale.float().amax(dim=1) * E2M1_MAX * layer.weight_scale_2.float() / 448
        assert torch.allclose(row, expected_row)


@pytest.mark.parametrize("method", METHODS)
def test_fusion_keeps_every_rows_numbers(method):
    layers, weights = _layers(method=method)
    fused = layers[0].method.fuse(layers, "attn.to_qkv")
    assert fused is not None and fused.out_features == 3 * 64 and type(fused.method) is method
    assert torch.equal(_per_row_dequantized(fused), torch.cat(weights))
    for attr in method.row_buffers:
        expected = torch.cat([getattr(layer, attr).reshape(-1) for layer in layers])
        assert torch.equal(getattr(fused, attr).reshape(-1), expected)
    assert float(fused._one) == 1.0
    if method is Nvfp4TritonW4A8Method:
        assert fused._w8_scale.shape == (1, 192)
    assert torch.equal(fused.bias, torch.cat([layer.bias for layer in layers]))


def test_weight_only_rows_carry_the_global_scale():
    """The weight-only pass multiplies code * block scale by 1, then by the row's global scale: in
    fp32 that is code * block scale * global, the format's weight to the bit."""
    layers, weights = _layers(method=Nvfp4TritonDequantMethod)
    for layer, w in zip(layers, weights):
        assert torch.equal(_per_row_dequantized(layer), w)
        assert torch.equal(layer._row_global, layer.weight_scale_2.float().expand(layer.out_features))


@pytest.mark.parametrize("method", METHODS)
def test_layers_that_differ_are_not_fused(method):
    layers, _ = _layers(method=method)
    other, _ = _layers(n_parts=1, k=128, method=method)
    assert layers[0].method.fuse([layers[0], other[0]], "x") is None  # another input width
    unbiased, _ = _layers(n_parts=1, bias=False, method=method)
    assert layers[0].method.fuse([layers[0], unbiased[0]], "x") is None
    stranger, _ = _layers(n_parts=1, method=next(m for m in METHODS if m is not method))
    assert layers[0].method.fuse([layers[0], stranger[0]], "x") is None  # another method


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m", [2, 300])
def test_fused_layer_gives_the_parts_outputs(m, method):
    layers, _ = _layers(n=256, k=512, device="cuda", method=method)
    fused = layers[0].method.fuse(layers, "attn.to_qkv")
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        parts = torch.cat([layer(x) for layer in layers], dim=-1).float()
        got = fused(x).float()
    # the same FP8 (or, for 2 rows, bf16) weight per row and the same per-token activations; the GEMM
    # may sum in another order for another N, so compare to bf16 rounding of the output
    assert ((got - parts).abs().max() / parts.abs().max()) < 1e-2


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["nvfp4-triton-w4a8", "nvfp4-triton-dequant"])
def test_nvfp4_in_rewritten_flux_blocks_matches_diffusers_blocks(tmp_path, backend):
    """The producers hand W4A8 the FP8 input diffusers' ops would give it, and the weight-only method
    gets diffusers' bf16 ops but the prologue kernel: the rewritten model agrees with the same layers
    in diffusers' blocks to FP8 (or bf16) rounding."""
    import diffgen
    from diffgen.numerics.nvfp4 import quantize_nvfp4 as quantize
    from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs
    from safetensors.torch import load_file, save_file
    import json

    src = save_tiny_transformer("flux1", tmp_path / "bf16", seed=0, dtype=torch.bfloat16)
    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    quantized = {}
    for name, t in tensors.items():
        block = name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".weight")
        if block and t.dim() == 2 and "norm" not in name and t.shape[1] % 16 == 0 and t.shape[0] % 16 == 0:
            prefix = name[: -len(".weight")]
            quantized[name], quantized[f"{prefix}.weight_scale"], quantized[f"{prefix}.weight_scale_2"] = \
                quantize(t.float())
        else:
            quantized[name] = t
    save_file(quantized, src / "diffusion_pytorch_model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "group_size": 16}
    (src / "config.json").write_text(json.dumps(config))
    inputs = tiny_transformer_inputs("flux1", tiny_transformer("flux1", seed=0), seed=1)
    inputs = {k: v.cuda().bfloat16() if torch.is_tensor(v) and v.is_floating_point() else
              (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    outs = {}
    for rewrites in (False, True):
        model = diffgen.load_transformer(src, device="cuda", dtype=torch.bfloat16, rewrites=rewrites,
                                         quant_backend=backend)
        if rewrites:
            assert set(model.diffgen_rewrites.values()) >= {"flux1-fused-qkv", "flux1-double-block",
                                                           "flux1-single-block"}
        with torch.no_grad():
            outs[rewrites] = model(**inputs, return_dict=False)[0].float()
    cos = torch.nn.functional.cosine_similarity(outs[True].flatten(), outs[False].flatten(), dim=0)
    assert cos > 0.999, float(cos)
