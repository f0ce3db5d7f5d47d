"""The builtin fp8 plugin against the format's definition and against the 16-bit model.

The fp8 checkpoints here are written by this file's own few lines (scale = amax / 448, clamp,
cast), not by diffgen.quantize, so loading is checked against an independent writer.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.builtin.fp8_methods import Fp8ReferenceMethod, Fp8ScaledMMMethod
from diffgen.errors import DiffgenError, LoadError, QuantConfigError
from diffgen.linear import QuantLinear
from diffgen.quant import LayerSpec, QuantConfig
from tests.conftest import cosine, run

WEIGHTS = "diffusion_pytorch_model.safetensors"
E4M3 = torch.float8_e4m3fn


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-448, 448).to(E4M3)


def write_fp8_checkpoint(src, dst, scheme: str, activation: str = "dynamic", skip=("proj_out",)):
    """An HF-style fp8 checkpoint written from the definition, with ``skip`` layers left 16-bit."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS)
    out = {}
    for name, t in tensors.items():
        prefix = name[: -len(".weight")]
        if not name.endswith(".weight") or t.dim() != 2 or prefix in skip:
            out[name] = t
            continue
        w = t.float()
        if scheme == "per-tensor":
            s = w.abs().max() / 448
            out[name], out[f"{prefix}.weight_scale"] = to_e4m3(w / s), s.reshape(1)
        elif scheme == "per-channel":
            s = w.abs().amax(dim=1, keepdim=True) / 448
            out[name], out[f"{prefix}.weight_scale"] = to_e4m3(w / s), s  # [N, 1]
        else:  # 128x128 blocks: pad, scale each block by its own amax, crop
            n, k = w.shape
            bn, bk = math.ceil(n / 128), math.ceil(k / 128)
            wp = F.pad(w, (0, bk * 128 - k, 0, bn * 128 - n)).reshape(bn, 128, bk, 128)
            s = wp.abs().amax(dim=(1, 3)) / 448
            q = to_e4m3(wp / s[:, None, :, None]).reshape(bn * 128, bk * 128)[:n, :k]
            out[name], out[f"{prefix}.weight_scale_inv"] = q.contiguous(), s
        if activation == "static":
            out[f"{prefix}.input_scale"] = torch.tensor(4.0 / 448)
    save_file(out, dst / WEIGHTS)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": activation,
                                  "ignored_layers": list(skip)}
    if scheme == "block":
        cfg["quantization_config"]["weight_block_size"] = [128, 128]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def reference_linear(layer: QuantLinear, x: torch.Tensor, scheme: str, activation: str) -> torch.Tensor:
    """The format's forward written out: dequantized weight times quantized-dequantized input."""
    if scheme == "block":
        s = layer.weight_scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)
        w = layer.weight.float() * s[: layer.out_features, : layer.in_features]
        k = x.shape[-1]
        xg = F.pad(x.float(), (0, -k % 128)).reshape(x.shape[0], -1, 128)
        sx = xg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
        xd = (to_e4m3(xg / sx).float() * sx).reshape(x.shape[0], -1)[:, :k]
    else:
        w = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
        if activation == "static":
            xd = to_e4m3(x / layer.input_scale).float() * layer.input_scale
        else:
            sx = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
            xd = to_e4m3(x / sx).float() * sx
    return F.linear(xd, w, layer.bias.float() if layer.bias is not None else None)


CASES = [("per-tensor", "dynamic"), ("per-tensor", "static"), ("per-channel", "dynamic"), ("block", "dynamic")]


@pytest.mark.parametrize("scheme,activation", CASES)
def test_checkpoint_granularities(flux_dir, flux_inputs, tmp_path, scheme, activation):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", scheme, activation)
    model = diffgen.load_transformer(ckpt, dtype=torch.float32)
    plan = model.diffgen_plan
    assert plan.claim.plugin == "fp8" and plan.config.scheme == scheme
    assert plan.config.param("activation_scheme") == activation
    assert plan.claim.specificity == 30  # config confirmed by the scale tensors
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    # 29 quantized linears, every one but proj_out (no plugin here fuses Q/K/V).
    assert "proj_out" not in layers and len(layers) == 29
    # Every layer: the reference method equals the definition (same ops, so only fp32 matmul
    # ordering differs: 1e-5 relative).
    torch.manual_seed(0)
    for name, layer in layers.items():
        x = torch.randn(5, layer.in_features) * 2
        y = layer(x)
        expected = reference_linear(layer, x, scheme, activation)
        assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), name
    # Whole model against 16-bit: e4m3 keeps ~2 significant digits per weight and activation.
    reference = run(diffgen.load_transformer(flux_dir, dtype=torch.float32), flux_inputs)
    assert cosine(run(model, flux_inputs), reference) >= 0.99


def test_static_checkpoint_without_input_scale_names_the_tensor(flux_dir, tmp_path):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor", "static")
    tensors = load_file(ckpt / WEIGHTS)
    del tensors["x_embedder.input_scale"]
    save_file(tensors, ckpt / WEIGHTS)
    with pytest.raises(LoadError, match=r"x_embedder\.input_scale"):
        diffgen.load_transformer(ckpt)


def test_weight_with_wrong_dtype_is_named(flux_dir, tmp_path):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-channel")
    tensors = load_file(ckpt / WEIGHTS)
    tensors["x_embedder.weight"] = tensors["x_embedder.weight"].view(torch.int8)
    save_file(tensors, ckpt / WEIGHTS)
    with pytest.raises(LoadError, match=r"x_embedder\.weight.*torch\.int8.*float8_e4m3fn"):
        diffgen.load_transformer(ckpt)


def test_modules_to_not_convert_and_16bit_layers_stay_linear(flux_dir, tmp_path):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-channel", skip=("proj_out", "context_embedder"))
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["modules_to_not_convert"] = qc.pop("ignored_layers")[:1]  # HF's other key; names only proj_out
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = diffgen.load_transformer(ckpt, dtype=torch.bfloat16)
    kept = {d.layer.name: d.reason for d in model.diffgen_plan.decisions if d.action == "keep"}
    # context_embedder is in no list, but the checkpoint stores it 16-bit with no scale.
    assert set(kept) == {"proj_out", "context_embedder"}
    assert type(model.context_embedder) is torch.nn.Linear
    assert model.context_embedder.weight.dtype == torch.bfloat16


def test_scaled_mm_method_matches_reference(tmp_path):
    """The native method's argument preparation (row-wise and per-tensor scales, static and
    dynamic activations) against the reference method; torch._scaled_mm also runs on the CPU."""
    torch.manual_seed(0)
    for scheme, activation in [("per-tensor", "static"), ("per-tensor", "dynamic"), ("per-channel", "dynamic"),
                               ("per-channel", "static")]:
        config = QuantConfig.make("fp8", scheme=scheme, params={"activation_scheme": activation})
        spec = LayerSpec("layer", 64, 48, True, torch.bfloat16)
        layers = [QuantLinear(spec, cls(config, spec), dtype=torch.bfloat16)
                  for cls in (Fp8ReferenceMethod, Fp8ScaledMMMethod)]
        w, bias = torch.randn(48, 64), torch.randn(48).bfloat16()
        scale = w.abs().max() / 448 if scheme == "per-tensor" else w.abs().amax(1) / 448
        for layer in layers:
            layer.weight.data = to_e4m3(w / (scale if scale.dim() == 0 else scale[:, None]))
            layer.weight_scale.data = scale.reshape(layer.weight_scale.shape)
            layer.bias.data = bias
            if activation == "static":
                layer.input_scale.data = torch.tensor(3.0 / 448)
            layer.method.process_weights_after_loading(layer)
        x = torch.randn(2, 7, 64).bfloat16()
        native, reference = layers[1](x).float(), layers[0](x).float()
        assert native.shape == (2, 7, 48)
        # Same quantized operands; the results differ by bf16 output rounding and accumulation
        # order only (bf16 has 8 significant bits: 2^-8 relative).
        assert torch.allclose(native, reference, rtol=2 ** -7, atol=2 ** -7 * reference.abs().max().item()), scheme


@pytest.mark.parametrize("scheme,activation", [("per-tensor", "static"), ("per-channel", "dynamic")])
def test_inputs_of_few_rows_keep_16bit_activations(scheme, activation):
    """Up to WEIGHT_ONLY_ROWS rows: y = x @ dequant(W)^T + b with x as it is (the static input_scale
    unused); one row more and the activation is quantized again."""
    from diffgen.builtin.fp8_methods import WEIGHT_ONLY_ROWS
    from diffgen.numerics.fp8 import dequantize_fp8, quantize_fp8_per_token, quantize_fp8_static
    from diffgen.testing.layers import fp8_linear

    torch.manual_seed(0)
    w, bias = torch.randn(48, 64) * 0.3, torch.randn(48) * 0.1
    layers = [fp8_linear(cls, w, scheme=scheme, activation=activation, bias=bias, input_scale=4.0 / 448)
              for cls in (Fp8ReferenceMethod, Fp8ScaledMMMethod)]
    scale = layers[0].weight_scale
    w_deq = dequantize_fp8(layers[0].weight, scale[:, None] if scale.dim() else scale)
    bias_bf16 = bias.bfloat16().float()

    def definition(x2, quantized):
        if quantized and activation == "static":
            s = layers[0].input_scale
            x2 = dequantize_fp8(quantize_fp8_static(x2, s), s)
        elif quantized:
            x2 = dequantize_fp8(*quantize_fp8_per_token(x2))
        return x2.float() @ w_deq.t() + bias_bf16

    for rows in (1, WEIGHT_ONLY_ROWS, WEIGHT_ONLY_ROWS + 1):
        x = torch.randn(rows, 64).bfloat16()
        expected = definition(x, quantized=rows > WEIGHT_ONLY_ROWS)
        other = definition(x, quantized=rows <= WEIGHT_ONLY_ROWS)
        tol = 2 ** -7 * expected.abs().max().item()
        for layer in layers:
            y = layer(x[None])[0].float()  # [1, rows, K]: rows counts every leading dimension
            assert torch.allclose(y, expected, rtol=2 ** -7, atol=tol), (layer.method.name, rows)
            # The other rule's numbers are much further off than bf16 rounding.
            assert (y - other).norm() > 4 * (y - expected).norm(), (layer.method.name, rows)


def test_quantize_writes_a_verified_checkpoint(flux_dir, flux_inputs, tmp_path):
    reference = run(diffgen.load_transformer(flux_dir, dtype=torch.float32), flux_inputs)
    online = run(diffgen.load_transformer(flux_dir, dtype=torch.float32, quantization="fp8"), flux_inputs)
    for scheme in ("per-channel", "per-tensor", "block"):
        out = tmp_path / f"fp8-{scheme}"
        stats = diffgen.quantize(flux_dir, out, scheme=scheme, ignored_layers=["norm1"])  # norm1 and norm1_context
        assert stats["quantized_layers"] == 18 and stats["shards"] == 1
        model = diffgen.load_transformer(out, dtype=torch.float32)
        assert model.diffgen_plan.config.scheme == scheme
        got = run(model, flux_inputs)
        assert cosine(got, reference) >= 0.99
        if scheme == "per-channel":  # the same numbers as quantizing while loading
            assert cosine(got, online) > 0.9999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8-block", "fp8-per-channel", "fp8-per-tensor"]


def test_quantize_shards_and_index(flux_dir, tmp_path, monkeypatch):
    from diffgen.tools import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "SHARD_BYTES", 20_000)
    out = tmp_path / "sharded"
    stats = diffgen.quantize(flux_dir, out)
    assert stats["shards"] > 1
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == stats["shards"]
    model = diffgen.load_transformer(out, dtype=torch.float32)
    assert model.diffgen_plan.config.family == "fp8"


def test_quantize_is_atomic_and_refuses_to_overwrite(flux_dir, tmp_path, monkeypatch):
    from diffgen.tools import quantize as quantize_module

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DiffgenError, match="exists"):
        diffgen.quantize(flux_dir, out)

    def broken_verify(*args, **kwargs):
        raise DiffgenError("verification failed: simulated")

    monkeypatch.setattr(quantize_module, "_verify", broken_verify)
    with pytest.raises(DiffgenError, match="simulated"):
        diffgen.quantize(flux_dir, out, overwrite=True)
    # Nothing already written is lost and no temporary directory is left behind.
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_quantize_refuses_quantized_input(flux_dir, tmp_path):
    diffgen.quantize(flux_dir, tmp_path / "once")
    with pytest.raises(QuantConfigError, match="already quantized"):
        diffgen.quantize(tmp_path / "once", tmp_path / "twice")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 (SM89+)")
@pytest.mark.parametrize("scheme,activation", CASES)
def test_native_matches_reference_on_gpu(flux_dir, flux_inputs, tmp_path, scheme, activation):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs SM89+")
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", scheme, activation)
    native = diffgen.load_transformer(ckpt, dtype=torch.bfloat16, device="cuda")
    reference = diffgen.load_transformer(ckpt, dtype=torch.bfloat16, device="cuda", quant_backend="fp8-reference")
    # The tiny model's K and N are multiples of 16 but not of 128: block layers cannot run natively.
    expected = "reference" if scheme == "block" else "native"
    assert {d.method.kind for d in native.diffgen_plan.decisions if d.method} == {expected}
    inputs = {k: v.cuda().to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
              (v.cuda() if torch.is_tensor(v) else v) for k, v in flux_inputs.items()}
    assert cosine(run(native, inputs), run(reference, inputs)) >= 0.999


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 (SM89+)")
@pytest.mark.parametrize("scheme,activation", CASES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_native_layer_matches_reference_on_gpu(scheme, activation, rows):
    """Layer shapes every native variant accepts (block: K a multiple of 512), odd row counts."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs SM89+")
    from diffgen.testing.layers import fp8_linear

    torch.manual_seed(0)
    weight, bias = (torch.randn(384, 512) * 0.05).cuda(), torch.randn(384).cuda()
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(1)).bfloat16().cuda()
    out = [fp8_linear(cls, weight, scheme=scheme, activation=activation, bias=bias, input_scale=4.0 / 448)(x).float()
           for cls in (Fp8ReferenceMethod, Fp8ScaledMMMethod)]
    assert cosine(out[1], out[0]) >= 0.9999


def test_block_native_needs_whole_aligned_blocks():
    """cuBLASLt silently miscomputes block scaling when K/128 is not a multiple of 4 (H100)."""
    from diffgen.builtin.fp8_methods import scaled_mm_unavailable_reason
    from diffgen.platform import Platform

    h100 = Platform("cuda", "cuda:0", "NVIDIA H100", (9, 0))
    block = QuantConfig.make("fp8", scheme="block", params={"block": (128, 128)})
    channel = QuantConfig.make("fp8", scheme="per-channel")
    for k, n, ok in [(3072, 3072, True), (12288, 384, True), (640, 640, False), (384, 3072, False), (512, 200, False)]:
        reason = scaled_mm_unavailable_reason(block, LayerSpec("l", k, n, False, torch.bfloat16), h100)
        assert (reason is None) == ok, (k, n, reason)
    assert scaled_mm_unavailable_reason(channel, LayerSpec("l", 640, 48, False, torch.bfloat16), h100) is None
    assert "SM89" in scaled_mm_unavailable_reason(channel, LayerSpec("l", 64, 64, False, torch.bfloat16),
                                                  Platform("cuda", "cuda:0", "A100", (8, 0)))
    assert "bf16/fp16" in scaled_mm_unavailable_reason(channel, LayerSpec("l", 64, 64, False, torch.float32), h100)


@pytest.mark.parametrize("change, says", [
    ({"activation_scheme": "sometimes"}, "activation_scheme='sometimes'"),
    ({"weight_block_size": [0, 0]}, "weight_block_size=[0, 0]; expected two positive integers"),
    ({"weight_block_size": [128]}, "weight_block_size=[128]"),
    ({"weight_block_size": [-128, 128]}, "weight_block_size=[-128, 128]"),
    ({"ignored_layers": [1, {"a": 2}]}, "ignored_layers=[1, {'a': 2}]; expected a list of module names"),
    ({"modules_to_not_convert": "proj_out"}, "modules_to_not_convert='proj_out'"),
    ({"quant_algo": "NVFP4"}, "quant_method fp8 contradicts quant_algo='NVFP4'"),
])
def test_inconsistent_fp8_declarations_are_refused_with_the_key(flux_dir, tmp_path, change, says):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"].update(change)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantConfigError, match="^plugin fp8 recognises this format but cannot load it: the "
                                               "declaration is inconsistent: ") as err:
        diffgen.load_transformer(ckpt, device="cpu")
    assert says in str(err.value)


def test_an_fp8_declaration_over_16bit_weights_is_not_loaded_as_16bit(flux_dir, tmp_path):
    ckpt = shutil.copytree(flux_dir, tmp_path / "declared")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantConfigError, match="declares fp8, but no weight in the checkpoint is float8_e4m3fn"):
        diffgen.load_transformer(ckpt, device="cpu")


@pytest.mark.parametrize("tensor", ["weight_scale", "input_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5])
def test_a_scale_that_would_ruin_the_layer_stops_the_load(flux_dir, tmp_path, tensor, value):
    ckpt = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor", activation="static")
    tensors = load_file(ckpt / WEIGHTS)
    name = f"transformer_blocks.0.attn.to_k.{tensor}"
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, ckpt / WEIGHTS)
    # NaN and inf are caught by the finite check of every loaded tensor, zero and negative values
    # by the method's scale check; both name the tensor and its file.
    with pytest.raises(LoadError, match=rf"^tensor '?{name}'?( in .*diffusion_pytorch_model.safetensors holds NaN"
                                        rf"| holds .* a scale must be finite and positive \(.*diffusion_pytorch_model"
                                        rf".safetensors\))"):
        diffgen.load_transformer(ckpt, device="cpu")
