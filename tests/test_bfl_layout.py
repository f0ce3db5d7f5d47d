"""FLUX.1 and FLUX.2 single files in Black Forest Labs' layout (and ComfyUI's prefixed copy of it).

End to end, a BFL file loaded by diffgen must run exactly like the same file converted by diffusers'
own single-file converter and loaded into the diffusers model: same module classes, same fp32
weights, so the outputs are compared bit for bit. The stream itself is checked on the tensors a
quantized file adds to every linear (scales per tensor, per row, per 16-element block).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import diffgen
from diffgen.builtin import bfl
from diffgen.errors import LoadError
from diffgen.plugins import get_plugin_host
from diffgen.quant import RepackTarget
from diffgen.tiny.transformers import TINY_TRANSFORMERS, tiny_transformer, tiny_transformer_inputs
from tests.conftest import run

CLASS = {"flux1": "FluxTransformer2DModel", "flux2": "Flux2Transformer2DModel"}


def _config(family: str) -> dict:
    return dict(tiny_transformer(family).config)


def bfl_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of BFL's reference model (black-forest-labs/flux ``Flux``,
    flux2 ``Flux2``) with the tiny config's sizes, written from those model definitions."""
    c = _config(family)
    h = c["num_attention_heads"] * c["attention_head_dim"]
    head = c["attention_head_dim"]
    out = c["patch_size"] ** 2 * (c.get("out_channels") or c["in_channels"])
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, n, k, bias):
        shapes[f"{name}.weight"] = (n, k)
        if bias:
            shapes[f"{name}.bias"] = (n,)

    def qk_norm(prefix):
        shapes[f"{prefix}.query_norm.scale"] = (head,)
        shapes[f"{prefix}.key_norm.scale"] = (head,)

    if family == "flux1":  # every linear has a bias; MLPEmbedder in_dim 256; mlp_ratio 4, GELU MLPs
        bias, t_in, mlp = True, 256, 4 * h
        mlp_in, single_in, single_out = mlp, 3 * h + mlp, h + mlp
        linear("vector_in.in_layer", h, c["pooled_projection_dim"], bias)
        linear("vector_in.out_layer", h, h, bias)
    else:  # no biases; SwiGLU MLPs: the input projection carries value and gate
        bias, t_in, mlp = False, c["timestep_guidance_channels"], int(h * c["mlp_ratio"])
        mlp_in, single_in, single_out = 2 * mlp, 3 * h + 2 * mlp, h + mlp
        linear("double_stream_modulation_img.lin", 6 * h, h, bias)
        linear("double_stream_modulation_txt.lin", 6 * h, h, bias)
        linear("single_stream_modulation.lin", 3 * h, h, bias)
    linear("img_in", h, c["in_channels"], bias)
    linear("txt_in", h, c["joint_attention_dim"], bias)
    for embedder in ("time_in", "guidance_in"):
        linear(f"{embedder}.in_layer", h, t_in, bias)
        linear(f"{embedder}.out_layer", h, h, bias)
    for stream in ("img", "txt"):
        d = f"double_blocks.0.{stream}"
        if family == "flux1":
            linear(f"{d}_mod.lin", 6 * h, h, bias)
        linear(f"{d}_attn.qkv", 3 * h, h, bias)
        qk_norm(f"{d}_attn.norm")
        linear(f"{d}_attn.proj", h, h, bias)
        linear(f"{d}_mlp.0", mlp_in, h, bias)
        linear(f"{d}_mlp.2", h, mlp, bias)
    if family == "flux1":
        linear("single_blocks.0.modulation.lin", 3 * h, h, bias)
    linear("single_blocks.0.linear1", single_in, h, bias)
    linear("single_blocks.0.linear2", h, single_out, bias)
    qk_norm("single_blocks.0.norm")
    linear("final_layer.linear", out, h, bias)
    linear("final_layer.adaLN_modulation.1", 2 * h, h, bias)
    return shapes


def bfl_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.2 for name, shape in bfl_shapes(family).items()}


def diffusers_conversion(family: str, state_dict: dict[str, torch.Tensor], monkeypatch) -> dict[str, torch.Tensor]:
    """The oracle: diffusers' own converter of BFL single files."""
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = dict(state_dict)
    if family == "flux2":
        return sfu.convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)
    # diffusers' FLUX.1 converter splits single_blocks.N.linear1 at FLUX.1-dev's widths (inner_dim
    # 3072, mlp_ratio 4) whatever the checkpoint's size; give that one split the tiny model's widths.
    inner = _config("flux1")["num_attention_heads"] * _config("flux1")["attention_head_dim"]
    split = torch.split

    def split_at_tiny_widths(tensor, sizes, dim=0):
        if tuple(sizes) == (3072, 3072, 3072, 12288):
            sizes = (inner, inner, inner, 4 * inner)
        return split(tensor, sizes, dim=dim)

    with monkeypatch.context() as m:
        m.setattr(torch, "split", split_at_tiny_widths)
        return sfu.convert_flux_transformer_checkpoint_to_diffusers(checkpoint)


# -- end to end: diffgen.load_transformer on a BFL file == diffusers' conversion ------------------
@pytest.mark.parametrize("prefix", ["", bfl.COMFYUI_PREFIX], ids=["bfl", "comfyui"])
@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_bfl_file_runs_like_the_diffusers_conversion(family, prefix, tmp_path, monkeypatch):
    state_dict = bfl_state_dict(family, seed=3)
    weights = tmp_path / f"{family}-bfl.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in state_dict.items()}, str(weights))
    config_dir = tmp_path / "transformer"
    tiny_transformer(family).save_config(config_dir)  # config.json only: the weights are the BFL file

    oracle = tiny_transformer(family, seed=99)
    oracle.load_state_dict(diffusers_conversion(family, state_dict, monkeypatch), strict=True)
    model = diffgen.load_transformer(config_dir, weights_path=weights, device="cpu", dtype="float32")

    inputs = tiny_transformer_inputs(family, oracle, seed=1)
    expected, got = run(oracle, inputs), run(model, inputs)
    assert torch.equal(got, expected)  # the same fp32 weights in the same modules: no tolerance needed
    assert not torch.equal(run(tiny_transformer(family, seed=99), inputs), expected)  # the weights matter


# -- the stream -----------------------------------------------------------------------------------
def _target(family: str, kind: str = "runtime") -> RepackTarget:
    return RepackTarget(kind, CLASS[family], _config(family))


def _convert(family: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in bfl.repack_checkpoint(iter(tensors.items()), _target(family)):
        assert name not in out, f"{name} produced twice"
        out[name] = tensor
    return out


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_meta_header_converts_to_exactly_the_model_tensors(family):
    header = {name: torch.empty(shape, device="meta") for name, shape in bfl_shapes(family).items()}
    converted = _convert(family, header)
    model = tiny_transformer(family).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.items()}
    assert all(t.device.type == "meta" for t in converted.values())


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_diffusers_names_pass_through_untouched(family):
    state_dict = tiny_transformer(family).state_dict()
    out = list(bfl.repack_checkpoint(iter(state_dict.items()), _target(family)))
    assert [n for n, _ in out] == list(state_dict)
    assert all(t is state_dict[n] for n, t in out)
    assert not any(bfl.is_bfl_name(n) for n in state_dict)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_converting_twice_is_converting_once(family):
    once = _convert(family, bfl_state_dict(family))
    twice = _convert(family, once)
    assert list(twice) == list(once) and all(twice[n] is once[n] for n in once)


def test_is_bfl_name():
    for name in ("double_blocks.3.img_attn.qkv.weight", "model.diffusion_model.single_blocks.0.linear1.scale_weight",
                 "final_layer.adaLN_modulation.1.bias", "single_blocks.7.norm.key_norm.scale"):
        assert bfl.is_bfl_name(name), name
    assert bfl.is_bfl_name("vector_in.in_layer.weight", "FluxTransformer2DModel")
    assert not bfl.is_bfl_name("vector_in.in_layer.weight", "Flux2Transformer2DModel")  # FLUX.2 has none
    for name in ("transformer_blocks.0.attn.to_q.weight", "proj_out.weight",
                 "single_transformer_blocks.0.norm.linear.bias"):
        assert not bfl.is_bfl_name(name), name
    assert bfl.bfl_to_diffusers_modules("FluxTransformer2DModel", "single_blocks.2.linear1") == [
        "single_transformer_blocks.2.attn.to_q", "single_transformer_blocks.2.attn.to_k",
        "single_transformer_blocks.2.attn.to_v", "single_transformer_blocks.2.proj_mlp"]


def test_only_flux_models_are_repacked():
    assert bfl.repack_checkpoint(iter([]), RepackTarget("runtime", "WanTransformer3DModel")) is None
    assert "bfl" in get_plugin_host().plugins and get_plugin_host().plugins["bfl"].builtin


QKV = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]


def test_companions_of_a_fused_qkv_are_split_or_copied():
    """NVFP4 and FP8 companions of double_blocks.0.img_attn.qkv (h = 32, so N = 96, K = 32)."""
    rows = torch.arange(96, dtype=torch.float32)
    packed = torch.arange(96, dtype=torch.uint8)[:, None].repeat(1, 16)  # packed E2M1 [N, K/2]; byte = row
    block_scales = torch.arange(96 * 2, dtype=torch.uint8).reshape(96, 2).view(torch.float8_e4m3fn)  # [N, K/16]
    tensors = {
        "double_blocks.0.img_attn.qkv.weight": packed,
        "double_blocks.0.img_attn.qkv.weight_scale": block_scales,
        "double_blocks.0.img_attn.qkv.weight_scale_2": torch.tensor(0.5),
        "double_blocks.0.img_attn.qkv.input_scale": torch.tensor([2.0]),
        "double_blocks.0.img_attn.qkv.bias": rows,
        "double_blocks.0.img_attn.qkv.pre_quant_scale": rows[:32],  # per input channel [K]: every part's
        "double_blocks.0.txt_attn.qkv.weight_scale": rows,  # per-row FP8 scale [N]
    }
    out = _convert("flux1", tensors)
    for i, module in enumerate(QKV):
        part = slice(32 * i, 32 * (i + 1))
        assert torch.equal(out[f"{module}.weight"], packed[part])
        assert out[f"{module}.weight_scale"].dtype == torch.float8_e4m3fn
        assert torch.equal(out[f"{module}.weight_scale"].view(torch.uint8), block_scales[part].view(torch.uint8))
        assert torch.equal(out[f"{module}.bias"], rows[part])
        assert torch.equal(out[f"{module}.weight_scale_2"], torch.tensor(0.5))
        assert torch.equal(out[f"{module}.input_scale"], torch.tensor([2.0]))
        assert torch.equal(out[f"{module}.pre_quant_scale"], rows[:32])
    for i, module in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        assert torch.equal(out[f"transformer_blocks.0.attn.{module}.weight_scale"], rows[32 * i:32 * (i + 1)])
    # Each part's per-tensor scale is its own copy: a plugin that scales one in place leaves the others.
    assert out[f"{QKV[0]}.weight_scale_2"].data_ptr() != out[f"{QKV[1]}.weight_scale_2"].data_ptr()


def test_flux1_linear1_is_cut_at_the_attention_and_mlp_widths():
    rows = torch.arange(3 * 32 + 128, dtype=torch.float32)
    out = _convert("flux1", {"single_blocks.0.linear1.weight_scale": rows,
                             "single_blocks.0.linear1.input_scale": torch.tensor(3.0)})
    s = "single_transformer_blocks.0"
    assert torch.equal(out[f"{s}.attn.to_v.weight_scale"], rows[64:96])
    assert torch.equal(out[f"{s}.proj_mlp.weight_scale"], rows[96:])
    assert all(torch.equal(out[f"{s}.{m}.input_scale"], torch.tensor(3.0))
               for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    flux2 = _convert("flux2", {"single_blocks.0.linear1.weight_scale": torch.ones(288)})  # stays fused in FLUX.2
    assert list(flux2) == ["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight_scale"]


def test_a_scale_of_another_size_is_refused_with_its_name():
    name = "double_blocks.0.img_attn.qkv.weight_scale"
    with pytest.raises(LoadError, match=rf"'{name}' of shape \(48,\).*fused linear of 96 rows"):
        _convert("flux1", {name: torch.ones(48)})
    with pytest.raises(LoadError, match=r"'single_blocks.0.linear1.weight_scale' of shape \(1, 14\).*224 rows"):
        _convert("flux1", {"single_blocks.0.linear1.weight_scale": torch.ones(1, 14)})  # 128x128 blocks


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_adaln_swap_applies_to_per_row_scales_too(family):
    rows = torch.arange(64, dtype=torch.float32)
    fp8_rows = torch.arange(64, dtype=torch.uint8)[:, None].repeat(1, 32).view(torch.float8_e4m3fn)  # bits = row
    out = _convert(family, {
        "final_layer.adaLN_modulation.1.weight": fp8_rows,
        "final_layer.adaLN_modulation.1.weight_scale": rows,
        "final_layer.adaLN_modulation.1.input_scale": torch.tensor(0.25),
    })
    scale_then_shift = torch.cat([rows[32:], rows[:32]])
    assert torch.equal(out["norm_out.linear.weight_scale"], scale_then_shift)
    assert torch.equal(out["norm_out.linear.weight"].view(torch.uint8),
                       scale_then_shift[:, None].repeat(1, 32).to(torch.uint8))
    assert torch.equal(out["norm_out.linear.input_scale"], torch.tensor(0.25))


def test_comfyui_scaled_fp8_names():
    p = bfl.COMFYUI_PREFIX
    out = _convert("flux1", {
        f"{p}scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),  # the file-wide marker: dropped
        f"{p}double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32, dtype=torch.float8_e4m3fn),
        f"{p}double_blocks.0.img_attn.qkv.scale_weight": torch.tensor([0.125]),
        f"{p}double_blocks.0.img_attn.qkv.scale_input": torch.tensor([1.0]),
        f"{p}double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16),
        f"{p}double_blocks.0.img_mlp.0.scale_weight": torch.tensor(0.5),
    })
    assert sorted(out) == sorted([*(f"{m}.{leaf}" for m in QKV for leaf in ("weight", "weight_scale", "input_scale")),
                                  "transformer_blocks.0.attn.norm_q.weight",
                                  "transformer_blocks.0.ff.net.0.proj.weight_scale"])
    assert all(torch.equal(out[f"{m}.weight_scale"], torch.tensor([0.125])) for m in QKV)


def test_the_stream_is_lazy():
    """One tensor in, its parts out: nothing is read ahead or buffered."""
    consumed = []

    def source():
        for name, shape in bfl_shapes("flux1").items():
            consumed.append(name)
            yield name, torch.empty(shape, device="meta")

    stream = bfl.repack_checkpoint(source(), _target("flux1"))
    assert consumed == []
    for name, _ in stream:
        assert bfl.is_bfl_name(consumed[-1]) and len(consumed) <= len(bfl_shapes("flux1"))
        break
    assert len(consumed) == 1


def test_tiny_families_are_the_ones_this_file_builds():
    assert {TINY_TRANSFORMERS[f]["class_name"] for f in CLASS} == set(bfl.RULES)


# -- quantized single files in the original layout: detected in the model's names, loaded as FP8 --
BLOCK_LINEAR = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
                "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2", "single_blocks.0.linear1",
                "single_blocks.0.linear2", "final_layer.adaLN_modulation.1")


def _quantize_fp8(state_dict, *, per_row: bool, comfyui: bool) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled FP8 (per-tensor ``scale_weight``, a ``scaled_fp8`` marker, the
    ``model.diffusion_model.`` prefix) or BFL/diffusers' fp8r (per-row ``weight_scale``)."""
    out = {}
    for name, t in state_dict.items():
        module = name.rpartition(".")[0]
        if module in BLOCK_LINEAR and name.endswith(".weight"):
            scale = (t.abs().amax(dim=1) if per_row else t.abs().amax()).float() / 448
            out[name] = (t / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
            out[f"{module}.{'scale_weight' if comfyui else 'weight_scale'}"] = scale
        else:
            out[name] = t
    if comfyui:
        out = {bfl.COMFYUI_PREFIX + k: v for k, v in out.items()}
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _dequantized(quantized) -> dict[str, torch.Tensor]:
    """The format's definition in BFL names: W = W_fp8 * scale (per tensor or per row)."""
    plain = {k.removeprefix(bfl.COMFYUI_PREFIX): v for k, v in quantized.items() if k != "scaled_fp8"}
    out = {}
    for name, t in plain.items():
        if name.endswith((".scale_weight", ".weight_scale")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            module = name.rpartition(".")[0]
            scale = plain.get(f"{module}.scale_weight", plain.get(f"{module}.weight_scale"))
            t = t.float() * (scale[:, None] if scale.dim() else scale)
        out[name] = t
    return out


@pytest.mark.parametrize("family, per_row, comfyui", [("flux1", False, True), ("flux2", True, False)],
                         ids=["flux1-comfyui-scaled-fp8", "flux2-fp8r"])
def test_fp8_single_file_in_the_original_layout_loads_as_fp8(family, per_row, comfyui, tmp_path, monkeypatch):
    quantized = _quantize_fp8(bfl_state_dict(family, seed=4), per_row=per_row, comfyui=comfyui)
    weights = tmp_path / "fp8.safetensors"
    save_file(quantized, str(weights))
    config_dir = tmp_path / "transformer"
    tiny_transformer(family).save_config(config_dir)
    model = diffgen.load_transformer(config_dir, weights_path=weights, device="cpu", dtype="float32")
    plan = model.diffgen_plan
    assert plan.config.family == "fp8" and "no quantization declared" in plan.claim.evidence
    # 8 BFL linears, in diffusers' names: each qkv is 3 layers; FLUX.1's linear1 is 4, FLUX.2's stays 1.
    assert len(plan.quantized()) == (15 if family == "flux1" else 12)
    assert report_says_fp8(config_dir, weights)
    oracle = tiny_transformer(family, seed=99)
    oracle.load_state_dict(diffusers_conversion(family, _dequantized(quantized), monkeypatch), strict=True)
    inputs = tiny_transformer_inputs(family, oracle, seed=1)
    # FP8 weights are the oracle's exactly; the only difference is the per-token FP8 rounding of the
    # activations, which on these tiny random models stays far inside 0.99 cosine.
    got, expected = run(model, inputs), run(oracle, inputs)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def report_says_fp8(config_dir, weights) -> bool:
    report = diffgen.inspect(config_dir, weights_path=weights, device="cpu")
    return report["winner"]["config"]["family"] == "fp8" and \
        report["weight_bytes"]["planned"] < report["weight_bytes"]["16bit"]


def test_generate_takes_a_bfl_single_file_as_the_transformer_weights(tmp_path, monkeypatch):
    from diffgen.cli import main
    from diffgen.tiny.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("flux1", tmp_path / "pipe")
    weights = tmp_path / "flux1-dev-comfyui-fp8.safetensors"
    save_file(_quantize_fp8(bfl_state_dict("flux1", seed=5), per_row=False, comfyui=True), str(weights))
    perf = tmp_path / "perf.json"
    assert main(["generate", "--model-path", str(pipe), "--transformer-weights-path", str(weights), "--prompt", "x",
                 "--num-inference-steps", "1", "--height", "64", "--width", "64", "--no-save-output",
                 "--perf-json", str(perf), "--quiet"]) == 0
    methods = json.loads(perf.read_text())["methods"]["transformer"]
    assert methods["single_transformer_blocks.*.proj_mlp"] != "16-bit"  # linear1's MLP part, FP8 in diffusers' name
    assert methods["x_embedder"] == "16-bit"


def test_the_plan_sees_a_bfl_file_in_the_models_names_and_reads_by_those_names(tmp_path, flux_dir):
    from diffgen.checkpoint import open_checkpoint
    from diffgen.layout import ModelLayoutSource, in_model_layout
    from diffgen.plan import build_meta_model, expected_tensors

    state_dict = bfl_state_dict("flux1", seed=6)
    weights = tmp_path / "bfl.safetensors"
    save_file(state_dict, str(weights))
    config_dir = tmp_path / "transformer"
    tiny_transformer("flux1").save_config(config_dir)
    raw = open_checkpoint(config_dir, weights_path=weights)
    model = build_meta_model(raw)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in expected_tensors(model, torch.float32).items()}
    target = RepackTarget("runtime", "FluxTransformer2DModel", dict(raw.config), shapes)
    view = in_model_layout(raw, get_plugin_host(), target)
    assert isinstance(view, ModelLayoutSource) and set(view.tensors) == set(shapes)
    assert view.file_of("transformer_blocks.0.attn.to_k.weight") == weights and view.declared_in == raw.declared_in
    q, k, v = state_dict["double_blocks.0.img_attn.qkv.weight"].chunk(3)
    assert torch.equal(view.read("transformer_blocks.0.attn.to_k.weight"), k)
    got = dict(view.iter_tensors(n for n in ("transformer_blocks.0.attn.to_v.weight",)))  # a generator of names
    assert list(got) == ["transformer_blocks.0.attn.to_v.weight"] and torch.equal(got[next(iter(got))], v)
    diffusers_layout = open_checkpoint(flux_dir)
    assert in_model_layout(diffusers_layout, get_plugin_host(), target) is diffusers_layout  # nothing to change


def test_a_scale_per_half_of_the_final_adaln_is_swapped_too():
    out = _convert("flux1", {"final_layer.adaLN_modulation.1.weight_scale": torch.tensor([2.0, 3.0])})
    assert torch.equal(out["norm_out.linear.weight_scale"], torch.tensor([3.0, 2.0]))
