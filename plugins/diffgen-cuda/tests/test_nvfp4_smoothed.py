"""ModelOpt NVFP4_SVD and NVFP4_AWQ exports (tests/fixtures/*-svdquant, *-awq: ModelOpt 0.47's
``svdquant`` and ``awq_lite`` algorithms and its HF export, on the CPU; see make_modelopt_fixtures.py).

Their layers carry ``pre_quant_scale`` (the smoothing) and, for SVD, ``svdquant_lora_a`` /
``svdquant_lora_b`` (a low-rank branch on the smoothed input). The independent check is ModelOpt
itself: before exporting, the fixture script recorded what ModelOpt's quantized linears computed
(``modelopt_layers.safetensors``), and diffgen's reference method, reading only the export, must
give those bits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from make_modelopt_fixtures import LOWRANK, fixture_transformer
from modelopt_fixtures import copy_export, edited_export, export_dir, nvfp4_definition, recorded_layers
from safetensors.torch import load_file

import diffgen
from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear, ShardError
from diffgen.numerics.e2m1 import e2m1_to_float, unpack_e2m1
from diffgen.quant import LayerSpec
from diffgen_cuda.extras import FOLDED_A
from diffgen_cuda.nvfp4 import Nvfp4ReferenceMethod, Nvfp4TritonDequantMethod
from diffgen_cuda.nvfp4_w4a8 import (Nvfp4TritonW4A8LowrankMethod, Nvfp4TritonW4A8Method, lowrank_rows,
                                     lowrank_rows_reference)

WEIGHTS = "diffusion_pytorch_model.safetensors"
SVD = ("flux1-nvfp4-svdquant", "wan-nvfp4-svdquant")
SMOOTHED = SVD + ("flux1-nvfp4-awq",)


def load(path, dtype=torch.float32, **kwargs):
    return diffgen.load_transformer(path, device="cpu", dtype=dtype, **kwargs)


def layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", SMOOTHED)
def test_every_recorded_layer_gives_modelopts_own_bits(name):
    model = layers(load(export_dir(name), dtype=torch.bfloat16))  # ModelOpt ran the model in bf16
    file = load_file(export_dir(name) / WEIGHTS)
    checked = 0
    for layer_name, x, want in recorded_layers(name):
        with torch.no_grad():
            assert torch.equal(model[layer_name](x), want), layer_name
        # the extras matter: the same layer without them is another function
        plain = {k: v for k, v in file.items() if not k.endswith(("pre_quant_scale", "_lora_a", "_lora_b"))}
        assert not torch.equal(nvfp4_definition(plain, layer_name, x, w4a4=True), want), layer_name
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("name", SMOOTHED)
def test_the_claim_names_each_layers_extras_from_the_tensors(name):
    file = load_file(export_dir(name) / WEIGHTS)
    plan = load(export_dir(name)).diffgen_plan
    smoothed = {k.rsplit(".", 1)[0] for k in file if k.endswith(".pre_quant_scale")}
    branches = {k.rsplit(".", 1)[0] for k in file if k.endswith(".svdquant_lora_a")}
    assert smoothed == {k.rsplit(".", 1)[0] for k in file if k.endswith(".weight_scale_2")}  # every NVFP4 layer
    assert set(plan.config.param("smoothed")) == smoothed
    assert dict(plan.config.param("lowrank") or ()) == {layer: LOWRANK for layer in branches}
    assert bool(branches) == (name in SVD)
    assert "smoothed (pre_quant_scale)" in plan.claim.evidence
    assert ("low-rank branch of rank 4" in plan.claim.evidence) == (name in SVD)
    assert plan.config.scheme == "w4a4"


def test_the_tensors_alone_say_the_same(tmp_path):
    ckpt = copy_export("flux1-nvfp4-svdquant", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("quantization_config")
    (ckpt / "config.json").write_text(json.dumps(config))
    declared, alone = load(export_dir("flux1-nvfp4-svdquant")), load(ckpt)
    assert alone.diffgen_plan.config.param("lowrank") == declared.diffgen_plan.config.param("lowrank")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    name = "transformer_blocks.0.attn.to_q"
    assert torch.equal(layers(alone)[name](x), layers(declared)[name](x))


def test_a_branch_missing_half_is_refused_naming_the_tensor_and_file(tmp_path):
    ckpt = edited_export("flux1-nvfp4-svdquant", tmp_path / "ckpt", lambda t: t.pop("transformer_blocks.0.attn.to_out.0.svdquant_lora_b"))
    with pytest.raises(DiffgenError, match=r"transformer_blocks\.0\.attn\.to_out\.0\.svdquant_lora_a \(in "
                                           r"diffusion_pytorch_model\.safetensors\) has no .*svdquant_lora_b"):
        load(ckpt)


def test_branches_of_two_ranks_are_refused(tmp_path):
    def cut(t):
        key = "transformer_blocks.0.ff.net.2.svdquant_lora_b"
        t[key] = t[key][:, :2].contiguous()

    with pytest.raises(DiffgenError, match=r"ff\.net\.2\.svdquant_lora_a \[4, 64\] and .*svdquant_lora_b \[16, 2\]"):
        load(edited_export("flux1-nvfp4-svdquant", tmp_path / "ckpt", cut))


def test_a_declared_svd_export_without_branches_is_refused(tmp_path):
    ckpt = edited_export("flux1-nvfp4-svdquant", tmp_path / "ckpt", lambda t: [t.pop(k) for k in list(t) if "svdquant_lora" in k])
    with pytest.raises(DiffgenError, match="declares NVFP4_SVD, but no layer has svdquant_lora_a"):
        load(ckpt)


def test_a_smoothing_of_the_wrong_width_stops_the_load_naming_it(tmp_path):
    def widen(t):
        key = "transformer_blocks.0.norm1.linear.pre_quant_scale"
        t[key] = torch.cat([t[key], t[key]])

    with pytest.raises(DiffgenError, match=r"transformer_blocks\.0\.norm1\.linear\.pre_quant_scale"):
        load(edited_export("flux1-nvfp4-svdquant", tmp_path / "ckpt", widen))


def test_the_mixed_bf16_converter_keeps_the_extras_of_what_stays_nvfp4(tmp_path):
    from diffgen_cuda.convert_nvfp4 import convert

    base = tmp_path / "base"
    fixture_transformer("flux1", torch.bfloat16).save_pretrained(base)  # the seed-0 model ModelOpt quantized
    out = tmp_path / "mixed"
    convert(export_dir("flux1-nvfp4-svdquant"), base, out, pattern_preset="flux1-nvfp4")
    converted = layers(load(out))
    exported = layers(load(export_dir("flux1-nvfp4-svdquant")))
    assert "transformer_blocks.0.norm1.linear" not in converted  # the preset keeps it in BF16, smoothing and all
    assert set(converted) < set(exported)
    for name, layer in converted.items():
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
        assert layer.method.rank == LOWRANK and layer.method.smoothed, name
        assert torch.equal(layer(x), exported[name](x)), name


def test_the_native_methods_keep_the_16bit_input_and_their_own_layers():
    config = load(export_dir("flux1-nvfp4-svdquant")).diffgen_plan.config
    spec = LayerSpec("transformer_blocks.0.attn.to_q", 16, 16, True, torch.bfloat16)
    w4a8 = Nvfp4TritonW4A8Method(config, spec)
    # FP8 handed over by a fused producer would skip the smoothing and the branch
    assert w4a8.has_extras and not w4a8.takes_prepared_input(None, 4608)
    plain = Nvfp4TritonW4A8Method(config.__class__.make("nvfp4", scheme="w4a4"), spec)
    assert not plain.has_extras and plain.takes_prepared_input(None, 4608)
    with pytest.raises(ShardError, match="AWQ smoothing or an SVDQuant low-rank branch"):
        Nvfp4TritonDequantMethod(config, spec).tp_shards("colwise", 2)


def _attention_parts(method_cls, parts=("to_q", "to_k", "to_v"), device="cpu", dtype=torch.float32):
    """FLUX.1's block-0 Q/K/V of the SVD export as ``method_cls`` layers, built from the file (on the
    CPU their kernels never run: the fused layer's tensors are what is checked there)."""
    file = load_file(export_dir("flux1-nvfp4-svdquant") / WEIGHTS)
    config = load(export_dir("flux1-nvfp4-svdquant")).diffgen_plan.config
    layers = []
    for part in parts:
        name = f"transformer_blocks.0.attn.{part}"
        spec = LayerSpec(name, 16, 16, True, dtype)
        method = method_cls(config, spec, unavailable_reason=None if device == "cuda" else "CPU: no kernels")
        layer = QuantLinear(spec, method, dtype=dtype)
        for key, param in layer.named_parameters():
            param.data = file[f"{name}.{key}"].to(device=device, dtype=param.dtype)
        layer.method.process_weights_after_loading(layer)
        layers.append(layer)
    return layers, file


@pytest.mark.parametrize("method_cls", [Nvfp4TritonDequantMethod, Nvfp4TritonW4A8Method])
def test_qkv_sharing_smoothing_and_down_projection_fuse_into_one_branch(method_cls):
    layers, file = _attention_parts(method_cls)
    fused = layers[0].method.fuse(layers, "transformer_blocks.0.attn.to_qkv")
    assert fused is not None and fused.method.smoothed and fused.method.rank == LOWRANK
    assert torch.equal(fused.svdquant_lora_b, torch.cat([layer.svdquant_lora_b for layer in layers]))
    assert torch.equal(fused.svdquant_lora_a, layers[0].svdquant_lora_a)
    # the fused tensors compute each part's definition: codes * block scale * the row's global scale,
    # the shared smoothing and down projection, each part's rows of the up projection
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    codes = e2m1_to_float(unpack_e2m1(fused.weight.data))
    w = codes * fused.weight_scale.float().repeat_interleave(16, dim=1) * fused._row_global[:, None]
    xs = x * fused.pre_quant_scale
    got = xs @ w.t() + fused.bias + (xs @ fused.svdquant_lora_a.t()) @ fused.svdquant_lora_b.t()
    name = "transformer_blocks.0.attn."
    parts = torch.cat([nvfp4_definition(file, name + p, x, w4a4=False) for p in ("to_q", "to_k", "to_v")], dim=-1)
    assert torch.allclose(got, parts, rtol=1e-5, atol=1e-6)


class _FoldedReference(Nvfp4ReferenceMethod):
    """The definition's GEMM with the extras folded as the fast methods fold them."""

    fold_extras = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_extras_compute_the_written_sum(dtype):
    # lora_a * s for the down projection and the branch added in place: the extras' sum as written,
    # to within the rounding of the layer's dtype
    exact, _ = _attention_parts(Nvfp4ReferenceMethod, parts=("to_q", "to_k"), dtype=dtype)
    folded, _ = _attention_parts(_FoldedReference, parts=("to_q", "to_k"), dtype=dtype)
    assert not hasattr(exact[0], FOLDED_A)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(exact, folded):
        assert torch.equal(getattr(b, FOLDED_A), (b.svdquant_lora_a.float() * b.pre_quant_scale.float()).to(dtype))
        with torch.no_grad():
            torch.testing.assert_close(b(x), a(x), **tol)
            # the branch is far above that tolerance: a fold that dropped or misplaced it would fail
            branch = F.linear(F.linear(x * a.pre_quant_scale, a.svdquant_lora_a), a.svdquant_lora_b)
        assert branch.abs().max() > 0.2


def test_a_fused_fast_layer_folds_its_shared_branch():
    layers, _ = _attention_parts(Nvfp4TritonW4A8Method)
    fused = layers[0].method.fuse(layers, "transformer_blocks.0.attn.to_qkv")
    assert fused.method.fold_extras and torch.equal(getattr(fused, FOLDED_A), getattr(layers[0], FOLDED_A))


def test_the_lowrank_experiment_folds_the_branch_into_the_fp8_rows():
    """nvfp4-triton-w4a8-lowrank: W8 * row is the format's weight plus lora_b @ lora_a to within
    E4M3's rounding of each element (half a step: 2^-4 of it, or of the smallest normal near 0)."""
    layers, file = _attention_parts(Nvfp4TritonW4A8LowrankMethod)
    for layer in layers:
        assert layer._lowrank_b.shape == (16, 16) and layer._lowrank_a.shape == (16, 16)  # rank 4, padded to 16
        assert not layer._lowrank_b[:, LOWRANK:].any() and not layer._lowrank_a[LOWRANK:].any()
        codes = e2m1_to_float(unpack_e2m1(layer.weight.data))
        total = (codes * layer.weight_scale.float().repeat_interleave(16, dim=1) * layer.weight_scale_2.float()
                 + layer.svdquant_lora_b.float() @ layer.svdquant_lora_a.float())
        row = layer._w8_scale.reshape(-1, 1)
        got = lowrank_rows_reference(layer).float() * row
        assert ((got - total).abs() <= torch.maximum(total.abs() * 2 ** -4, row * 2 ** -7)).all()
        assert (lowrank_rows_reference(layer).float().abs().amax(dim=1) > 400).all()  # each row spans E4M3
        # the branch is in it: the same rows without it are farther from the total than the bound
        plain = codes * layer.weight_scale.float().repeat_interleave(16, dim=1) * layer.weight_scale_2.float()
        assert (plain - total).abs().max() > 4 * (got - total).abs().max()
    fused = layers[0].method.fuse(layers, "transformer_blocks.0.attn.to_qkv")
    assert torch.equal(fused._lowrank_a, layers[0]._lowrank_a)
    assert torch.equal(lowrank_rows_reference(fused).view(torch.uint8),
                       torch.cat([lowrank_rows_reference(layer) for layer in layers]).view(torch.uint8))


def test_the_lowrank_method_is_the_default_only_where_a_branch_is():
    from diffgen.platform import Platform
    from diffgen.plugins import choose_method
    from diffgen_cuda import nvfp4_w4a8

    config = load(export_dir("flux1-nvfp4-svdquant")).diffgen_plan.config
    hopper = Platform(device_kind="cuda", device="cuda:0", device_name="test GPU", capability=(9, 0))
    with_branch = [name for name, rank in dict(config.param("lowrank")).items() if rank]
    assert with_branch
    spec = LayerSpec(with_branch[0], 16, 16, True, torch.bfloat16)
    offers = nvfp4_w4a8.offer(config, spec, hopper)
    assert [m.name for m in offers] == ["nvfp4-triton-w4a8", "nvfp4-triton-w4a8-lowrank"]
    for m in offers:  # as where its kernels run
        m.unavailable_reason = None
    offers = [("cuda", m) for m in offers]
    assert choose_method(offers, spec.name)[1].name == "nvfp4-triton-w4a8-lowrank"
    assert choose_method(offers, spec.name, "nvfp4-triton-w4a8")[1].name == "nvfp4-triton-w4a8"
    # a layer without a branch (ModelOpt stores none where SVD was not applied): plain W4A8 only
    plain = LayerSpec("not.a.layer.with.a.branch", 16, 16, True, torch.bfloat16)
    assert [m.name for m in nvfp4_w4a8.offer(config, plain, hopper)] == ["nvfp4-triton-w4a8"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU of SM89+ with Triton")
def test_the_lowrank_pass_writes_its_reference_on_the_gpu():
    layers, file = _attention_parts(Nvfp4TritonW4A8LowrankMethod, device="cuda", dtype=torch.bfloat16)
    fused = layers[0].method.fuse(layers, "transformer_blocks.0.attn.to_qkv")
    for layer in layers + [fused]:
        got, want = lowrank_rows(layer).float(), lowrank_rows_reference(layer).float()
        # the tensor cores sum b @ a in another order: at most one E4M3 step apart
        assert ((got - want).abs() <= want.abs() * 2 ** -3 + 2 ** -6).all()
    x = torch.randn(300, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        parts = [layer(x).float() for layer in layers]
        got = fused(x).float()
    for part, name in zip(parts, ("to_q", "to_k", "to_v")):
        # the W4A16 definition with its extras, 16-bit activations: FP8 activations and rows apart
        want = nvfp4_definition(file, f"transformer_blocks.0.attn.{name}", x, w4a4=False).float()
        assert ((part - want).norm() / want.norm()) < 0.05
    assert ((got - torch.cat(parts, -1)).abs().max() / torch.cat(parts, -1).abs().max()) < 1e-2


def test_parts_whose_branches_differ_stay_apart():
    layers, _ = _attention_parts(Nvfp4TritonDequantMethod)
    layers[1].svdquant_lora_a.data = layers[1].svdquant_lora_a.data * 2
    assert layers[0].method.fuse(layers, "transformer_blocks.0.attn.to_qkv") is None
    plain, _ = _attention_parts(Nvfp4TritonDequantMethod, parts=("to_q",))
    plain[0].method.rank = 0  # a part without a branch
    assert layers[0].method.fuse([layers[0], plain[0]], "x") is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU of SM89+ with Triton")
@pytest.mark.parametrize("method_cls", [Nvfp4TritonDequantMethod, Nvfp4TritonW4A8Method])
@pytest.mark.parametrize("m", [2, 300])
def test_the_fused_layer_with_extras_gives_the_parts_outputs_on_the_gpu(method_cls, m):
    layers, _ = _attention_parts(method_cls, device="cuda", dtype=torch.bfloat16)
    fused = layers[0].method.fuse(layers, "transformer_blocks.0.attn.to_qkv")
    x = torch.randn(m, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        parts = torch.cat([layer(x) for layer in layers], dim=-1).float()
        got = fused(x).float()
    # the same weights, smoothing and branch; the GEMMs may sum in another order for another N
    assert ((got - parts).abs().max() / parts.abs().max()) < 1e-2


def test_inspect_names_the_per_layer_lists_by_their_length(capsys):
    from diffgen.cli import main

    assert main(["inspect", str(export_dir("flux1-nvfp4-svdquant")), "--device", "cpu"]) == 0
    config_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("config:"))
    assert "'lowrank': '<19 layers>'" in config_line and "'smoothed': '<19 layers>'" in config_line
