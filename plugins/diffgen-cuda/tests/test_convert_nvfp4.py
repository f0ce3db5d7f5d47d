"""diffgen convert modelopt-nvfp4 on the real ModelOpt NVFP4 export (tests/fixtures/flux1-nvfp4), and
the exports whose config says they are laid out otherwise (swapped nibbles, tiled scales)."""

from __future__ import annotations

import json

import pytest
import torch
from make_modelopt_fixtures import fixture_transformer
from modelopt_fixtures import copy_export, export_dir
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.checkpoint import open_checkpoint
from diffgen.cli import main as cli
from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear
from diffgen.numerics.e2m1 import swap_nibbles
from diffgen.numerics.nvfp4 import linear_to_swizzled_scales
from diffgen_cuda.convert_nvfp4 import convert

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "transformer"
    fixture_transformer("flux1", torch.bfloat16).save_pretrained(path)  # the weights ModelOpt quantized
    return path


def test_flux1_preset_keeps_sglangs_bf16_modules_and_the_rest_is_the_exports(base, tmp_path):
    out = tmp_path / "mixed"
    stats = convert(export_dir("flux1-nvfp4"), base, out, pattern_preset="flux1-nvfp4")
    assert stats["fallback_modules"] == 8 and stats["output_shards"] == 1
    model = diffgen.load_transformer(out, device="cpu", dtype=torch.float32)
    base_model = diffgen.load_transformer(base, device="cpu", dtype=torch.float32)
    export = load_file(export_dir("flux1-nvfp4") / WEIGHTS)
    for name in ("transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp",
                 "transformer_blocks.0.norm1.linear"):
        layer = model.get_submodule(name)
        assert type(layer) is torch.nn.Linear
        assert torch.equal(layer.weight, base_model.get_submodule(name).weight)
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer, QuantLinear) and torch.equal(layer.weight, export["transformer_blocks.0.attn.to_q.weight"])


def test_swapped_nibbles_are_written_low_first_and_patterns_are_globs(base, tmp_path):
    out = tmp_path / "swapped"
    stats = convert(export_dir("flux1-nvfp4"), base, out, keep_bf16_patterns=("*.attn.to_k",),
                    swap_weight_nibbles=True)
    assert stats["swap_weight_nibbles"] and stats["fallback_modules"] == 2  # double and single block to_k
    written = open_checkpoint(out)
    export = load_file(export_dir("flux1-nvfp4") / WEIGHTS)
    name = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(written.read(name), swap_nibbles(export[name]))
    assert written.tensors["transformer_blocks.0.attn.to_k.weight"].dtype == torch.bfloat16


def test_refusals(base, tmp_path):
    with pytest.raises(DiffgenError, match="converts ModelOpt NVFP4 exports.*quant_algo FP8"):
        convert(export_dir("flux1-fp8"), base, tmp_path / "x")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(DiffgenError):
        convert(export_dir("flux1-nvfp4"), base, existing)
    assert existing.is_dir() and not any(existing.iterdir())  # nothing touched


def test_cli(base, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["convert", "modelopt-nvfp4", "--modelopt-hf-dir", str(export_dir("flux1-nvfp4")),
                "--base-transformer-dir", str(base), "--output-dir", str(out), "--pattern-preset", "flux1-nvfp4"]) == 0
    assert json.loads(capsys.readouterr().out)["fallback_modules"] == 8


def _edit(ckpt, **changes):
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"].update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def test_an_export_declaring_swapped_nibbles_and_tiled_scales_loads_like_modelopts(tmp_path):
    ckpt = copy_export("flux1-nvfp4", tmp_path / "sglang-style")
    tensors = load_file(ckpt / WEIGHTS)
    for name in [n for n in tensors if n.endswith(".weight") and tensors[n].dtype == torch.uint8]:
        tensors[name] = swap_nibbles(tensors[name])
        scale = name.replace(".weight", ".weight_scale")
        tensors[scale] = linear_to_swizzled_scales(tensors[scale].view(torch.uint8)).view(torch.float8_e4m3fn)
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    _edit(ckpt, swap_weight_nibbles=True, checkpoint_weight_scale_layout="swizzled")
    model = diffgen.load_transformer(ckpt, device="cpu", dtype=torch.float32)
    reference = diffgen.load_transformer(export_dir("flux1-nvfp4"), device="cpu", dtype=torch.float32)
    assert "nibbles packed high-first" in model.diffgen_plan.claim.evidence
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            other = reference.get_submodule(name)
            assert torch.equal(layer.weight, other.weight) and torch.equal(layer.weight_scale.view(torch.uint8),
                                                                           other.weight_scale.view(torch.uint8))
