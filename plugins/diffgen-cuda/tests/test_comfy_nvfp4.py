"""FLUX.2 NVFP4 single files laid out for ComfyUI (BFL's FLUX.2-dev NVFP4 file, ComfyUI's "mixed
precision" files), recognised from the file alone.

The fixtures are written here from the format's definition, not by diffgen: random E2M1 codes
packed high nibble first, random E4M3 block scales in cuBLAS's 128x4 tiles (placed byte by byte
from the layout's offset formula), a global scale; markers as ``comfy_quant`` tensors under
ComfyUI's prefix or as BFL's ``_quantization_metadata`` header. The oracle is diffusers' own
conversion of the BFL file's dequantized weights; each loaded layer is decoded in this file
(low nibble first, row-major scales: the layout diffgen loads into).
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import save_file

import diffgen
from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
PREFIX = "model.diffusion_model."
# h = 2 x 16 = 32: every block-scale grid is padded to 128x4 tiles, so the shape says "tiled".
PADDED = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0,
              axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
# h = 2 x 64 = 128: every quantized linear has N a multiple of 128 and K/16 of 4, so the tiled and
# the row-major shapes are equal and only the markers can tell.
AMBIGUOUS = {**PADDED, "attention_head_dim": 64, "axes_dims_rope": (16, 16, 16, 16)}
QUANTIZED = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
             "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2", "double_blocks.0.txt_mlp.0",
             "single_blocks.0.linear1", "single_blocks.0.linear2", "final_layer.adaLN_modulation.1")


def bfl_flux2_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """BFL's Flux2 reference model (no biases, SwiGLU MLPs) at config ``c``'s sizes."""
    h, head = c["num_attention_heads"] * c["attention_head_dim"], c["attention_head_dim"]
    mlp = int(h * c["mlp_ratio"])
    s = {"img_in.weight": (h, c["in_channels"]), "txt_in.weight": (h, c["joint_attention_dim"]),
         "double_stream_modulation_img.lin.weight": (6 * h, h), "double_stream_modulation_txt.lin.weight": (6 * h, h),
         "single_stream_modulation.lin.weight": (3 * h, h), "single_blocks.0.linear1.weight": (3 * h + 2 * mlp, h),
         "single_blocks.0.linear2.weight": (h, h + mlp), "final_layer.linear.weight": (c["in_channels"], h),
         "final_layer.adaLN_modulation.1.weight": (2 * h, h)}
    for e in ("time_in", "guidance_in"):
        s[f"{e}.in_layer.weight"], s[f"{e}.out_layer.weight"] = (h, c["timestep_guidance_channels"]), (h, h)
    for stream in ("img", "txt"):
        d = f"double_blocks.0.{stream}"
        s |= {f"{d}_attn.qkv.weight": (3 * h, h), f"{d}_attn.proj.weight": (h, h),
              f"{d}_mlp.0.weight": (2 * mlp, h), f"{d}_mlp.2.weight": (h, mlp)}
        s |= {f"{d}_attn.norm.{q}_norm.scale": (head,) for q in ("query", "key")}
    s |= {f"single_blocks.0.norm.{q}_norm.scale": (head,) for q in ("query", "key")}
    return s


def tiles(scale: torch.Tensor) -> torch.Tensor:
    """Row-major [R, C] block scales -> the stored [ceil(R/128)*128, ceil(C/4)*4] bytes: row
    r = 128i + 32j + t, column c = 4l + m sits in 512-byte tile (i, l) at offset 16t + 4j + m."""
    rows, cols = scale.shape
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    offset = ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    out = torch.zeros(rp * cp, dtype=torch.uint8)
    out[offset.reshape(-1)] = scale.view(torch.uint8).reshape(-1)
    return out.reshape(rp, cp).view(torch.float8_e4m3fn)


def comfy_nvfp4(n: int, k: int, generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One layer's stored tensors and the weight they stand for."""
    codes = torch.randint(0, 16, (n, k), generator=generator)
    scale = (torch.rand(n, k // 16, generator=generator) * 3 + 0.25).to(torch.float8_e4m3fn)
    scale_2 = torch.tensor(0.0123)
    weight = E2M1[codes] * scale.float().repeat_interleave(16, dim=1) * scale_2
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # element 2i in the high nibble
    return {"weight": packed, "weight_scale": tiles(scale), "weight_scale_2": scale_2}, weight


def decode_loaded(layer) -> torch.Tensor:
    """ModelOpt's layout, which diffgen loads into: low nibble first, row-major scales."""
    packed = layer.weight
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    scales = layer.weight_scale.float().repeat_interleave(16, dim=1)
    return (E2M1[codes] * scales * layer.weight_scale_2.float())[:, :layer.in_features]


def write_file(tmp_path, config: dict, *, markers: str, input_scale: bool = True, seed: int = 0):
    """A BFL-named FLUX.2 file with QUANTIZED in ComfyUI's NVFP4; ``markers``: "tensor" (ComfyUI's
    comfy_quant tensors, names under model.diffusion_model.), "metadata" (BFL's header) or "none".
    Returns (config dir, weights file, BFL state dict of what the file stands for)."""
    generator = torch.Generator().manual_seed(seed)
    file, logical = {}, {}
    for name, shape in bfl_flux2_shapes(config).items():
        module = name.rpartition(".")[0]
        if module in QUANTIZED:
            stored, logical[name] = comfy_nvfp4(*shape, generator)
            file |= {f"{module}.{leaf}": t for leaf, t in stored.items()}
            if input_scale:
                file[f"{module}.input_scale"] = torch.tensor(0.05)
            if markers == "tensor":
                file[f"{module}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()),
                                                             dtype=torch.uint8)
        else:
            file[name] = logical[name] = torch.randn(shape, generator=generator) * 0.2
    metadata = None
    if markers == "metadata":
        metadata = {"_quantization_metadata": json.dumps(
            {"format_version": "1.0", "layers": {m: {"format": "nvfp4"} for m in QUANTIZED}})}
    if markers == "tensor":
        file = {PREFIX + k: v for k, v in file.items()}
    weights = tmp_path / "flux2-dev-nvfp4.safetensors"
    save_file(file, str(weights), metadata=metadata)
    config_dir = tmp_path / "transformer"
    diffusers.Flux2Transformer2DModel(**config).save_config(config_dir)
    return config_dir, weights, logical


def load(config_dir, weights):
    return diffgen.load_transformer(config_dir, weights_path=weights, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("config, markers", [(PADDED, "tensor"), (PADDED, "metadata"), (PADDED, "none"),
                                             (AMBIGUOUS, "tensor"), (AMBIGUOUS, "metadata")],
                         ids=["padded-comfy_quant", "padded-metadata", "padded-shape-only", "ambiguous-comfy_quant",
                              "ambiguous-metadata"])
def test_every_layer_loads_as_the_definition_of_the_file(tmp_path, config, markers):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    config_dir, weights, logical = write_file(tmp_path, config, markers=markers)
    model = load(config_dir, weights)
    plan = model.diffgen_plan
    assert plan.config.family == "nvfp4" and plan.config.param("weight_scale_layout") == "swizzled"
    assert plan.config.param("swap_weight_nibbles") is True
    assert ("ComfyUI marks 9 layers nvfp4" if markers != "none" else "128x4-tiled shape") in plan.claim.evidence
    expected = convert_flux2_transformer_checkpoint_to_diffusers(dict(logical))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 13  # 9 BFL linears, each double-block qkv as 3
    for name, layer in layers.items():
        assert layer.method.scheme == "w4a4"  # the file's input_scale: static activations
        # codes x E4M3 scale x global scale, the same three fp32 factors in the same order: bit-exact
        assert torch.equal(decode_loaded(layer), expected[f"{name}.weight"]), name


def test_the_mixed_file_without_input_scales_runs_weight_only(tmp_path):
    """BFL's "-mixed" file has no input_scale: nothing says how activations were quantized, so they
    stay 16-bit (as for the same file in ModelOpt's layout, test_nvfp4.py)."""
    config_dir, weights, _ = write_file(tmp_path, PADDED, markers="metadata", input_scale=False)
    model = load(config_dir, weights)
    assert {m.method.scheme for m in model.modules() if isinstance(m, QuantLinear)} == {"w4a16"}


def test_without_markers_equal_shapes_cannot_say_tiled(tmp_path):
    """N a multiple of 128 and K/16 of 4: nothing in the file tells ComfyUI's layout from ModelOpt's,
    so it loads as ModelOpt's (the file is a ModelOpt export as far as anything can tell)."""
    config_dir, weights, _ = write_file(tmp_path, AMBIGUOUS, markers="none")
    plan = diffgen.inspect(config_dir, weights_path=weights, device="cpu")
    assert plan["winner"]["config"]["family"] == "nvfp4"
    assert "weight_scale_layout" not in plan["winner"]["config"]["params"]


def test_inspect_names_the_markers_and_shows_a_quarter_of_the_bytes(tmp_path):
    config_dir, weights, _ = write_file(tmp_path, PADDED, markers="tensor")
    report = diffgen.inspect(config_dir, weights_path=weights, device="cpu")
    assert "comfy_quant" in report["winner"]["evidence"]
    assert report["weight_bytes"]["planned"] < report["weight_bytes"]["16bit"]


@pytest.mark.parametrize("key, value", [("swap_weight_nibbles", False), ("checkpoint_weight_scale_layout", "linear")])
def test_a_config_that_says_otherwise_is_an_error_naming_file_and_tensor(tmp_path, key, value):
    config_dir, weights, _ = write_file(tmp_path, PADDED, markers="tensor")
    config = json.loads((config_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", key: value}
    (config_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffgenError, match=rf"(?s){key}=.*{weights.name}.*comfy_quant"):
        load(config_dir, weights)


def test_a_row_major_scale_under_an_nvfp4_marker_is_an_error_naming_it(tmp_path):
    config_dir, weights, _ = write_file(tmp_path, PADDED, markers="tensor")
    from safetensors.torch import load_file

    file = load_file(weights)
    name = f"{PREFIX}double_blocks.0.img_mlp.2.weight_scale"
    file[name] = torch.ones(32, 6).to(torch.float8_e4m3fn)  # [N, K/16] row-major, not [128, 8] tiles
    save_file(file, str(weights))
    with pytest.raises(DiffgenError, match=r"(?s)double_blocks.0.img_mlp.2.weight_scale should be float8_e4m3fn "
                                           r"\[128, 8\].*\[32, 6\]"):
        load(config_dir, weights)


def test_tiles_that_cannot_be_cut_into_the_parts_of_a_fused_linear_are_refused(tmp_path):
    """h = 64: the final adaLN linear has 128 rows and 4 scale columns, so its tiles look row-major,
    and its halves (64 rows each) do not span whole 128-row tiles. Every real FLUX size does."""
    config = {**PADDED, "attention_head_dim": 32, "axes_dims_rope": (8, 8, 8, 8)}
    config_dir, weights, _ = write_file(tmp_path, config, markers="metadata")
    with pytest.raises(DiffgenError, match=r"final_layer.adaLN_modulation.1.weight_scale holds 128x4 tiles over 128 "
                                           r"rows, which diffgen cuts into parts of \[64, 64\] rows"):
        load(config_dir, weights)


@pytest.mark.cuda
def test_the_packed_method_on_the_gpu_computes_each_layer_of_the_file(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config_dir, weights, _ = write_file(tmp_path, AMBIGUOUS, markers="metadata", input_scale=False)
    # the weight-only method computes the file's weights exactly (SM89+ picks the W4A8 one by default)
    model = diffgen.load_transformer(config_dir, weights_path=weights, device="cuda", dtype=torch.bfloat16,
                                     quant_backend="weight-only")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {m.method.kind for m in layers.values()} == {"weight-only"}
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        x = torch.randn(64, layer.in_features, generator=generator)
        with torch.no_grad():
            got = layer(x.cuda().bfloat16()).float().cpu()
        expected = x @ decode_loaded(_to_cpu(layer)).T
        # the weight is decoded exactly in bf16 (E2M1 x E4M3 fits; the global scale rounds once);
        # the rest is the bf16 GEMM against an fp32 one
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999, name


def _to_cpu(layer):
    class Stored:
        weight, weight_scale = layer.weight.cpu(), layer.weight_scale.cpu()
        weight_scale_2, in_features = layer.weight_scale_2.cpu(), layer.in_features
    return Stored
