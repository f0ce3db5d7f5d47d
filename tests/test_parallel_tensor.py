"""Tensor-parallel splits of linear weights and their scales (``LinearMethod.tp_shards``), the
per-rank slice reader, and ``diffgen inspect --tp-size``. Running a split model (FLUX.1,
``--tp-size 2`` on two gloo processes) is tested in test_parallel_tp.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffgen.builtin.fp8_methods import Fp8ReferenceMethod, quantize_weight
from diffgen.cli import main
from diffgen.linear import LinearMethod, QuantLinear, ShardError
from diffgen.parallel.tensor import per_rank_bytes, read_shard, shard_slices, style_of, tp_plan
from diffgen.quant import LayerSpec, QuantConfig

SIZE = 2
ROWS = 3  # <= WEIGHT_ONLY_ROWS: the input stays 16-bit, so a split changes no rounding (see below)


def _layer(scheme: str, n: int, k: int, tensors: dict[str, torch.Tensor], bias: torch.Tensor) -> QuantLinear:
    config = QuantConfig("fp8", scheme=scheme)
    spec = LayerSpec("blocks.0.attn1.to_q", k, n, True, torch.float32)
    layer = QuantLinear(spec, Fp8ReferenceMethod(config, spec), dtype=torch.float32)
    for key, t in {**tensors, "bias": bias}.items():
        setattr(layer, key, torch.nn.Parameter(t.clone(), requires_grad=False))
    layer.method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("scheme,n,k", [("per-tensor", 64, 96), ("per-channel", 64, 96), ("block", 256, 256)])
@pytest.mark.parametrize("style", ["colwise", "rowwise"])
def test_fp8_shards_compute_the_whole_layer(scheme, n, k, style):
    """Each rank's layer, built from its slices of the checkpoint tensors, computes its part of the
    whole layer: column-parallel outputs concatenate to y, row-parallel partial sums (bias added
    once, after the reduction) add up to y. Inputs of ROWS rows are not quantized, so a split moves
    no rounding: the only difference is fp32 summation order over K (row-wise: two partial sums),
    at most a few ulp of |y| ~ 10; 1e-4 leaves margin while a wrong slice or scale is off by > 0.1."""
    torch.manual_seed(0)
    w, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(ROWS, k)
    tensors = quantize_weight(w, scheme)
    whole = _layer(scheme, n, k, tensors, bias)
    y = whole(x)
    shards = whole.method.tp_shards(style, SIZE)
    parts = []
    for rank in range(SIZE):
        mine = {key: t[shard_slices(tuple(t.shape), shards.get(key), rank, SIZE, key)] for key, t in tensors.items()}
        rank_bias = bias[shard_slices((n,), shards.get("bias"), rank, SIZE, "bias")] if style == "colwise" \
            else torch.zeros(n)
        n_r, k_r = mine["weight"].shape
        rank_x = x if style == "colwise" else x[:, rank * k_r:(rank + 1) * k_r]
        parts.append(_layer(scheme, n_r, k_r, mine, rank_bias)(rank_x))
    got = torch.cat(parts, dim=1) if style == "colwise" else sum(parts) + bias
    assert (got - y).abs().max().item() < 1e-4


def test_block_scales_split_only_in_whole_blocks():
    tensors = quantize_weight(torch.randn(128, 256), "block")
    layer = _layer("block", 128, 256, tensors, torch.zeros(128))
    shard = layer.method.tp_shards("colwise", SIZE)["weight"]
    with pytest.raises(ShardError, match="size 128 does not split into 2 equal parts in whole blocks of 128"):
        shard_slices((128, 256), shard, 0, SIZE, "weight")


def test_online_per_tensor_refuses():
    config = QuantConfig("fp8", scheme="per-tensor", online=True)
    spec = LayerSpec("blocks.0.attn1.to_q", 32, 32, False, torch.float32)
    with pytest.raises(ShardError, match="its own scale"):
        Fp8ReferenceMethod(config, spec).tp_shards("colwise", SIZE)


def test_a_method_without_a_split_refuses_with_its_name():
    class Opaque(LinearMethod):
        name = "opaque-kernel"

    spec = LayerSpec("blocks.0.ffn.net.2", 32, 32, False, torch.float32)
    with pytest.raises(ShardError, match="linear method opaque-kernel does not say how.*blocks.0.ffn.net.2"):
        Opaque(QuantConfig("x"), spec).tp_shards("rowwise", SIZE)


def test_read_shard_reads_the_rank_slice(tmp_path):
    from diffgen.linear import TensorShard

    t = torch.arange(48.0).reshape(6, 8)
    save_file({"w": t}, tmp_path / "a.safetensors")
    assert torch.equal(read_shard(tmp_path / "a.safetensors", "w", TensorShard(0), 1, 2), t[3:])
    assert torch.equal(read_shard(tmp_path / "a.safetensors", "w", TensorShard(1), 0, 2), t[:, :4])
    assert torch.equal(read_shard(tmp_path / "a.safetensors", "w", None, 1, 2), t)


def test_per_rank_bytes_of_16bit_flux1():
    """Every planned linear halves its weight (and its bias when column-parallel); the rest is
    whole on every rank. Counted here straight from the module tree."""
    from diffgen.tiny.transformers import tiny_transformer

    model = tiny_transformer("flux1")
    plan = tp_plan(model)
    expected = {n: t for n, t in model.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in expected.values())
    saved = 0
    for name, module in model.named_modules():
        style = style_of(plan, name)
        if style and isinstance(module, torch.nn.Linear):
            saved += module.weight.numel() * 4 // 2
            if style == "colwise" and module.bias is not None:
                saved += module.bias.numel() * 4 // 2
    report = per_rank_bytes(model, SIZE, expected)
    assert report["refused"] == {}
    assert report["per_rank_bytes"] == total - saved
    assert saved > 0.2 * total  # the split matters: a quarter of the tiny model, whose embedders are as big as its blocks


def test_inspect_shows_per_rank_bytes(tmp_path, capsys):
    from diffgen.tiny.transformers import save_tiny_transformer

    path = save_tiny_transformer("wan", tmp_path / "transformer", seed=0, dtype=torch.float32)
    assert main(["inspect", str(path), "--device", "cpu", "--quantization", "fp8", "--tp-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel 2:" in out and "10 linears split" in out
