"""``diffgen convert modelopt-fp8`` on ModelOpt's real exports and backbone.pt files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.cli import main as cli_main
from diffgen.errors import DiffgenError
from diffgen.tiny.transformers import tiny_transformer_inputs
from diffgen_cuda import convert as convert_module
from diffgen_cuda.convert import convert
from modelopt_fixtures import backbone_path, copy_export, cosine, export_dir, run, write_base_transformer

E4M3 = torch.float8_e4m3fn
INDEX = "diffusion_pytorch_model.safetensors.index.json"
# The presets applied to the tiny models (one double and one single block each).
FALLBACK = {
    "flux1": {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
              "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
              "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
              "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.0.proj_mlp"},
    "qwen_image": {"img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                   "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out",
                   "transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.img_mod.1",
                   "transformer_blocks.0.txt_mod.1"},
    "hunyuan_video": {"x_embedder.proj", "norm_out.linear", "proj_out", "transformer_blocks.0.norm1.linear",
                      "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.0.norm.linear",
                      *(f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "guidance", "text")
                        for i in (1, 2))},  # plus every context_embedder.* module, checked below
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {f: write_base_transformer(f"{f}-fp8", root / f) for f in FALLBACK}


def amax_scales(family: str) -> dict[str, torch.Tensor]:
    state = torch.load(backbone_path(f"{family}-fp8"), weights_only=True)["model_state_dict"]
    return {k.replace("_quantizer._amax", "_scale"): v.float() / 448 for k, v in state.items() if k.endswith("_amax")}


@pytest.mark.parametrize("family", list(FALLBACK))
def test_convert_real_exports(family, bases, tmp_path):
    out = tmp_path / "out"
    stats = convert(export_dir(f"{family}-fp8"), backbone_path(f"{family}-fp8"), bases[family], out)
    written = {}
    index = json.loads((out / INDEX).read_text())
    for shard in set(index["weight_map"].values()):
        written.update(load_file(out / shard))
    base = load_file(bases[family] / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    ignore = cfg["quantization_config"]["ignore"]
    fallback = {n[: -len(".weight")] for n in base if n.endswith(".weight") and
                (n[: -len(".weight")] in FALLBACK[family] or n.startswith("context_embedder.") and family == "hunyuan_video")}
    assert stats["fallback"] == len(fallback) and stats["shards"] == 1 and set(index["weight_map"]) == set(written)
    assert not [n for n in written if "_quantizer." in n]
    assert cfg["quantization_config"]["quant_method"] == "modelopt" and cfg["quantization_config"]["quant_algo"] == "FP8"
    scales = amax_scales(family)
    for module in fallback:  # the base's BF16 tensors, no scales, and named in the ignore list
        assert torch.equal(written[f"{module}.weight"], base[f"{module}.weight"]), module
        assert f"{module}.weight_scale" not in written and module in ignore
    quantized = [n[: -len(".weight")] for n, t in written.items() if n.endswith(".weight") and t.dtype == E4M3]
    assert stats["quantized"] == len(quantized) > 0 and stats["scale_tensors"] == 2 * len(quantized)
    for module in quantized:  # scales are amax / 448 from backbone.pt, weights within FP8 rounding
        assert torch.equal(written[f"{module}.weight_scale"], scales[f"{module}.weight_scale"].reshape(()))
        assert torch.equal(written[f"{module}.input_scale"], scales[f"{module}.input_scale"].reshape(()))
        w = base[f"{module}.weight"].float()
        deq = written[f"{module}.weight"].float() * written[f"{module}.weight_scale"]
        assert torch.allclose(deq, w, rtol=2 ** -4, atol=written[f"{module}.weight_scale"].item() * 2 ** -9)
    # It loads through diffgen, with the fallbacks 16-bit, and matches the 16-bit model.
    model = diffgen.load_transformer(out, dtype=torch.float32)
    kept = {d.layer.name for d in model.diffgen_plan.decisions if d.action == "keep"}
    assert {m for m in fallback if base[f"{m}.weight"].dim() == 2} <= kept  # not norms, nor HunyuanVideo's Conv3d
    reference = diffgen.load_transformer(bases[family], dtype=torch.float32)
    inputs = tiny_transformer_inputs(family, reference, seed=9)
    assert cosine(run(model, inputs), run(reference, inputs)) >= 0.99


def test_fallback_wins_over_modelopt_ignore(bases, tmp_path):
    """A module in both the preset and ModelOpt's ignore list, stored FP8 in the export (SGLang's
    ordering bug): the output must hold the base's BF16 tensor, not the export's FP8 one."""
    src = copy_export("flux1-fp8", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append("transformer_blocks.0.norm1.linear")
    (src / "config.json").write_text(json.dumps(cfg))
    stats = convert(src, backbone_path("flux1-fp8"), bases["flux1"], tmp_path / "out")
    written = load_file(tmp_path / "out" / "diffusion_pytorch_model-00001-of-00001.safetensors")
    assert written["transformer_blocks.0.norm1.linear.weight"].dtype == torch.bfloat16
    assert stats["fallback"] == 8 and stats["preserved_ignored"] == 2  # the two proj_out


def test_bf16_export_is_quantized_from_the_amax(bases, tmp_path):
    """Exports whose weights are still 16-bit (no weight_scale) get FP8 weights from backbone.pt."""
    src = copy_export("flux1-fp8", tmp_path / "src")
    base = load_file(bases["flux1"] / "diffusion_pytorch_model.safetensors")
    save_file(base, src / "diffusion_pytorch_model.safetensors")
    stats = convert(src, backbone_path("flux1-fp8"), bases["flux1"], tmp_path / "out", model_type="none")
    assert stats["fallback"] == 0 and stats["quantized"] == 28 and stats["auto_ignored"] == 0
    model = diffgen.load_transformer(tmp_path / "out", dtype=torch.float32)
    assert sum(d.action == "quantize" for d in model.diffgen_plan.decisions) == 28


def test_shards_and_index(bases, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "SHARD_BYTES", 10_000)
    stats = convert(export_dir("hunyuan_video-fp8"), backbone_path("hunyuan_video-fp8"), bases["hunyuan_video"],
                    tmp_path / "out")
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert stats["shards"] > 1 and len(set(index["weight_map"].values())) == stats["shards"]
    assert diffgen.load_transformer(tmp_path / "out", dtype=torch.float32).diffgen_plan.claim.plugin == "cuda"


def test_cli_prints_stats_refuses_existing_output_and_is_atomic(bases, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["convert", "modelopt-fp8", "--modelopt-hf-dir", str(export_dir("qwen_image-fp8")),
            "--modelopt-backbone-ckpt", str(backbone_path("qwen_image-fp8").parent),
            "--base-transformer-dir", str(bases["qwen_image"]), "--output-dir", str(out)]
    assert cli_main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["model_type"] == "qwen-image" and stats["fallback"] == 9
    assert set(stats) >= {"quantized", "fallback", "preserved_ignored", "scale_tensors", "shards"}
    assert cli_main(argv) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err

    def broken_verify(*args, **kwargs):
        raise DiffgenError("verification failed: simulated")

    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(convert_module, "verify", broken_verify)
    assert cli_main([*argv, "--overwrite"]) == 2
    assert "simulated" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_wrong_inputs_say_what_to_do(bases, tmp_path):
    with pytest.raises(DiffgenError, match="^diffgen convert modelopt-fp8 converts ModelOpt FP8 exports.*this one has quant_algo NVFP4"):
        convert(export_dir("flux1-nvfp4"), backbone_path("flux1-fp8"), bases["flux1"], tmp_path / "a")
    with pytest.raises(DiffgenError, match="--model-type hunyuan-video: this export is a FluxTransformer2DModel, "
                                           "whose preset is flux1"):
        convert(export_dir("flux1-fp8"), backbone_path("flux1-fp8"), bases["flux1"], tmp_path / "b",
                model_type="hunyuan-video")
    with pytest.raises(DiffgenError, match="has no weight and input amax for 17 layers the export quantized "
                                           r"\(e.g. context_embedder, single_transformer_blocks.0.attn.to_k"):
        convert(export_dir("flux1-fp8"), backbone_path("qwen_image-fp8"), bases["flux1"], tmp_path / "c",
                model_type="none")
    assert not list(tmp_path.iterdir())


def test_converter_imports_no_pipeline():
    code = ("import sys, diffgen_cuda.convert; bad = [m for m in sys.modules if m.split('.')[0] == 'diffusers' "
            "or m in ('diffgen.pipeline', 'diffgen.run', 'diffgen.loader', 'triton')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_pattern_that_is_not_a_regex_is_refused_before_anything_is_read(tmp_path):
    from diffgen.cli import main

    out = tmp_path / "out"
    assert main(["convert", "modelopt-fp8", "--modelopt-hf-dir", "/nowhere", "--modelopt-backbone-ckpt", "/nowhere",
                 "--base-transformer-dir", "/nowhere", "--output-dir", str(out), "--keep-bf16-pattern", "("]) == 2
    assert not out.exists()


class _RunsCode:
    """Unpickling this calls os.system: what a malicious backbone.pt would do."""

    def __reduce__(self):
        import os
        return os.system, ("touch /nonexistent-diffgen-pickle-ran",)


def test_legacy_backbone_loads_and_a_malicious_one_is_refused(bases, tmp_path):
    """A pre-1.6 torch.save (not a zip, so it cannot be memory-mapped) is read through the same
    weights_only unpickler: the benign one converts to exactly what the zip backbone.pt gives."""
    state = torch.load(backbone_path("flux1-fp8"), weights_only=True)
    legacy = tmp_path / "legacy" / "backbone.pt"
    legacy.parent.mkdir()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert not __import__("zipfile").is_zipfile(legacy)
    convert(export_dir("flux1-fp8"), legacy, bases["flux1"], tmp_path / "from-legacy")
    convert(export_dir("flux1-fp8"), backbone_path("flux1-fp8"), bases["flux1"], tmp_path / "from-zip")
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    got, want = load_file(tmp_path / "from-legacy" / shard), load_file(tmp_path / "from-zip" / shard)
    assert got.keys() == want.keys() and all(torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))
                                             for k in got)

    for zipped in (False, True):
        evil = tmp_path / f"evil-{zipped}" / "backbone.pt"
        evil.parent.mkdir()
        torch.save({"model_state_dict": {"x.weight_quantizer._amax": torch.ones(()), "payload": _RunsCode()}},
                   evil, _use_new_zipfile_serialization=zipped)
        with pytest.raises(DiffgenError, match=r"torch.load\(weights_only=True\) could not read"):
            convert(export_dir("flux1-fp8"), evil, bases["flux1"], tmp_path / f"out-{zipped}")
        assert not (tmp_path / f"out-{zipped}").exists()
    assert not __import__("os").path.exists("/nonexistent-diffgen-pickle-ran")
