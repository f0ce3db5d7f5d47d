"""Checkpoints in SGLang-Diffusion's runtime names load as the diffusers models they came from.

The runtime layout is built here from SGLang's own diffusers -> runtime table
(``HunyuanVideoArchConfig.param_names_mapping``, copied below as data, not from
diffgen_cuda.sglang_names), applied to ModelOpt's real HunyuanVideo export: fused weights are
concatenated in shard order and their scales stacked per shard, as SGLang's loader does.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.cli import main as cli_main
from diffgen.quant import RepackTarget
from diffgen.tiny.transformers import tiny_transformer_inputs
from diffgen_cuda import sglang_names
from modelopt_fixtures import copy_export, export_dir, run

WEIGHTS = "diffusion_pytorch_model.safetensors"
# SGLang's HunyuanVideoArchConfig.param_names_mapping: diffusers regex -> runtime (name, shard, shards)
SGLANG_HUNYUAN = {
    r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_1\.(.*)$": r"txt_in.t_embedder.mlp.fc_in.\1",
    r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_2\.(.*)$": r"txt_in.t_embedder.mlp.fc_out.\1",
    r"^context_embedder\.proj_in\.(.*)$": r"txt_in.input_embedder.\1",
    r"^context_embedder\.time_text_embed\.text_embedder\.linear_1\.(.*)$": r"txt_in.c_embedder.fc_in.\1",
    r"^context_embedder\.time_text_embed\.text_embedder\.linear_2\.(.*)$": r"txt_in.c_embedder.fc_out.\1",
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm1\.(.*)$": r"txt_in.refiner_blocks.\1.norm1.\2",
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm2\.(.*)$": r"txt_in.refiner_blocks.\1.norm2.\2",
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_q\.(.*)$": (r"txt_in.refiner_blocks.\1.self_attn_qkv.\2", 0, 3),
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_k\.(.*)$": (r"txt_in.refiner_blocks.\1.self_attn_qkv.\2", 1, 3),
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_v\.(.*)$": (r"txt_in.refiner_blocks.\1.self_attn_qkv.\2", 2, 3),
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0\.(.*)$": r"txt_in.refiner_blocks.\1.self_attn_proj.\2",
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0(?:\.proj)?\.(.*)$": r"txt_in.refiner_blocks.\1.mlp.fc_in.\2",
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2(?:\.proj)?\.(.*)$": r"txt_in.refiner_blocks.\1.mlp.fc_out.\2",
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear\.(.*)$": r"txt_in.refiner_blocks.\1.adaLN_modulation.linear.\2",
    r"^x_embedder\.proj\.(.*)$": r"img_in.proj.\1",
    r"^time_text_embed\.timestep_embedder\.linear_1\.(.*)$": r"time_in.mlp.fc_in.\1",
    r"^time_text_embed\.timestep_embedder\.linear_2\.(.*)$": r"time_in.mlp.fc_out.\1",
    r"^time_text_embed\.guidance_embedder\.linear_1\.(.*)$": r"guidance_in.mlp.fc_in.\1",
    r"^time_text_embed\.guidance_embedder\.linear_2\.(.*)$": r"guidance_in.mlp.fc_out.\1",
    r"^time_text_embed\.text_embedder\.linear_1\.(.*)$": r"vector_in.fc_in.\1",
    r"^time_text_embed\.text_embedder\.linear_2\.(.*)$": r"vector_in.fc_out.\1",
    r"^transformer_blocks\.(\d+)\.norm1\.linear\.(.*)$": r"double_blocks.\1.img_mod.linear.\2",
    r"^transformer_blocks\.(\d+)\.norm1_context\.linear\.(.*)$": r"double_blocks.\1.txt_mod.linear.\2",
    r"^transformer_blocks\.(\d+)\.attn\.norm_q\.(.*)$": r"double_blocks.\1.img_attn_q_norm.\2",
    r"^transformer_blocks\.(\d+)\.attn\.norm_k\.(.*)$": r"double_blocks.\1.img_attn_k_norm.\2",
    r"^transformer_blocks\.(\d+)\.attn\.to_q\.(.*)$": (r"double_blocks.\1.img_attn_qkv.\2", 0, 3),
    r"^transformer_blocks\.(\d+)\.attn\.to_k\.(.*)$": (r"double_blocks.\1.img_attn_qkv.\2", 1, 3),
    r"^transformer_blocks\.(\d+)\.attn\.to_v\.(.*)$": (r"double_blocks.\1.img_attn_qkv.\2", 2, 3),
    r"^transformer_blocks\.(\d+)\.attn\.add_q_proj\.(.*)$": (r"double_blocks.\1.txt_attn_qkv.\2", 0, 3),
    r"^transformer_blocks\.(\d+)\.attn\.add_k_proj\.(.*)$": (r"double_blocks.\1.txt_attn_qkv.\2", 1, 3),
    r"^transformer_blocks\.(\d+)\.attn\.add_v_proj\.(.*)$": (r"double_blocks.\1.txt_attn_qkv.\2", 2, 3),
    r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.(.*)$": r"double_blocks.\1.img_attn_proj.\2",
    r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.(.*)$": r"double_blocks.\1.txt_attn_proj.\2",
    r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.(.*)$": r"double_blocks.\1.txt_attn_q_norm.\2",
    r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.(.*)$": r"double_blocks.\1.txt_attn_k_norm.\2",
    r"^transformer_blocks\.(\d+)\.ff\.net\.0(?:\.proj)?\.(.*)$": r"double_blocks.\1.img_mlp.fc_in.\2",
    r"^transformer_blocks\.(\d+)\.ff\.net\.2(?:\.proj)?\.(.*)$": r"double_blocks.\1.img_mlp.fc_out.\2",
    r"^transformer_blocks\.(\d+)\.ff_context\.net\.0(?:\.proj)?\.(.*)$": r"double_blocks.\1.txt_mlp.fc_in.\2",
    r"^transformer_blocks\.(\d+)\.ff_context\.net\.2(?:\.proj)?\.(.*)$": r"double_blocks.\1.txt_mlp.fc_out.\2",
    r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.(.*)$": r"single_blocks.\1.q_norm.\2",
    r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.(.*)$": r"single_blocks.\1.k_norm.\2",
    r"^single_transformer_blocks\.(\d+)\.attn\.to_q\.(.*)$": (r"single_blocks.\1.linear1.\2", 0, 4),
    r"^single_transformer_blocks\.(\d+)\.attn\.to_k\.(.*)$": (r"single_blocks.\1.linear1.\2", 1, 4),
    r"^single_transformer_blocks\.(\d+)\.attn\.to_v\.(.*)$": (r"single_blocks.\1.linear1.\2", 2, 4),
    r"^single_transformer_blocks\.(\d+)\.proj_mlp\.(.*)$": (r"single_blocks.\1.linear1.\2", 3, 4),
    r"^single_transformer_blocks\.(\d+)\.proj_out\.(.*)$": r"single_blocks.\1.linear2.\2",
    r"^single_transformer_blocks\.(\d+)\.norm\.linear\.(.*)$": r"single_blocks.\1.modulation.linear.\2",
    r"^norm_out\.linear\.(.*)$": r"final_layer.adaLN_modulation.linear.\1",
    r"^proj_out\.(.*)$": r"final_layer.linear.\1",
}


def to_runtime_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SGLang's loader, in short: rename, and stack shards of fused layers in shard order."""
    out, shards = {}, {}
    for name, tensor in tensors.items():
        for pattern, target in SGLANG_HUNYUAN.items():
            if re.match(pattern, name):
                if isinstance(target, tuple):
                    runtime, index, count = target
                    shards.setdefault(re.sub(pattern, runtime, name), [None] * count)[index] = tensor
                else:
                    out[re.sub(pattern, target, name)] = tensor
                break
        else:
            out[name] = tensor
    for name, parts in shards.items():
        assert all(p is not None for p in parts), name
        # weight/bias: rows concatenated; per-tensor scales: one per shard, [S] (SGLang's
        # PerTensorScaleParameter)
        out[name] = torch.stack([p.reshape(()) for p in parts]) if parts[0].dim() == 0 else torch.cat(parts)
    return out


def runtime_named_export(path):
    """ModelOpt's HunyuanVideo export as SGLang-Diffusion writes it: runtime names, fused shards."""
    ckpt = copy_export("hunyuan_video-fp8", path)
    runtime = to_runtime_names(load_file(export_dir("hunyuan_video-fp8") / WEIGHTS))
    assert "double_blocks.0.img_attn_qkv.weight" in runtime and "single_blocks.0.linear1.weight" in runtime
    assert runtime["double_blocks.0.img_attn_qkv.weight_scale"].shape == (3,)
    assert runtime["single_blocks.0.linear1.weight"].shape == (16 * 3 + 64, 16)  # q, k, v, mlp
    save_file(runtime, ckpt / WEIGHTS)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["final_layer.linear", "single_blocks.0.linear2"]  # runtime names
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def test_runtime_named_hunyuan_video_loads_like_the_diffusers_export(tmp_path):
    source = export_dir("hunyuan_video-fp8")
    ckpt = runtime_named_export(tmp_path / "runtime")
    model = diffgen.load_transformer(ckpt, dtype=torch.float32)
    reference = diffgen.load_transformer(source, dtype=torch.float32)
    kept = {d.layer.name for d in model.diffgen_plan.decisions if d.action == "keep"}
    assert kept == {"proj_out", "single_transformer_blocks.0.proj_out"}
    assert model.diffgen_plan.config.ignored_by("proj_out") == ("checkpoint", "proj_out")
    # The same FP8 bytes and scales arrive under the diffusers names: identical outputs.
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    inputs = tiny_transformer_inputs("hunyuan_video", reference, seed=3)
    assert torch.equal(run(model, inputs), run(reference, inputs))


def test_repack_writes_the_diffusers_layout_once(tmp_path, capsys):
    """diffgen repack runs the same renames and splits offline; the result needs none of them."""
    ckpt = runtime_named_export(tmp_path / "runtime")
    assert cli_main(["repack", str(ckpt), str(tmp_path / "repacked")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["claimed_by"] == "cuda" and stats["renamed_or_new_tensors"] > 0
    repacked = load_file(tmp_path / "repacked" / WEIGHTS)
    export = load_file(export_dir("hunyuan_video-fp8") / WEIGHTS)
    assert not any(n.startswith(("double_blocks.", "single_blocks.")) for n in repacked)
    # The fused shards split back into ModelOpt's own diffusers export, tensor for tensor (scalars in
    # the runtime's 0-d shape).
    assert repacked.keys() == export.keys()
    for name, tensor in export.items():
        assert torch.equal(repacked[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    model = diffgen.load_transformer(tmp_path / "repacked", dtype=torch.float32)
    reference = diffgen.load_transformer(export_dir("hunyuan_video-fp8"), dtype=torch.float32)
    inputs = tiny_transformer_inputs("hunyuan_video", reference, seed=3)
    assert torch.equal(run(model, inputs), run(reference, inputs))


def test_runtime_ignore_names_translate_to_diffusers_modules():
    hv = "HunyuanVideoTransformer3DModel"
    assert sglang_names.diffusers_module_names(hv, "double_blocks.7.img_mod.linear") == ["transformer_blocks.7.norm1.linear"]
    assert sglang_names.diffusers_module_names(hv, "double_blocks.0.txt_attn_qkv") == [
        "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.add_v_proj"]
    assert sglang_names.diffusers_module_names(hv, "txt_in.refiner_blocks.1.adaLN_modulation.linear") == [
        "context_embedder.token_refiner.refiner_blocks.1.norm_out.linear"]
    assert sglang_names.diffusers_module_names(hv, "transformer_blocks.0.norm1.linear") == []  # already diffusers
    assert sglang_names.diffusers_module_names("FluxTransformer2DModel", "final_layer.linear") == []
    qwen = "QwenImageTransformer2DModel"
    assert sglang_names.diffusers_module_names(qwen, "transformer_blocks.3.img_mod") == ["transformer_blocks.3.img_mod.1"]


def test_qwen_image_fused_added_qkv_splits_with_its_scales():
    d, k = 16, 32
    w = torch.randn(3 * d, k).to(torch.float8_e4m3fn)
    bias = torch.randn(3 * d)
    stream = iter([("transformer_blocks.0.attn.to_added_qkv.weight", w),
                   ("transformer_blocks.0.attn.to_added_qkv.bias", bias),
                   ("transformer_blocks.0.attn.to_added_qkv.weight_scale", torch.tensor(0.5)),
                   ("transformer_blocks.0.attn.to_added_qkv.input_scale", torch.tensor([0.1, 0.2, 0.3])),
                   ("transformer_blocks.0.attn.to_q.weight", w[:d])])
    target = RepackTarget("runtime", "QwenImageTransformer2DModel", {},
                          {"transformer_blocks.0.attn.to_q.weight": ((d, k), torch.float8_e4m3fn)})
    out = dict(sglang_names.runtime_to_diffusers(stream, target))
    for i, proj in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        prefix = f"transformer_blocks.0.attn.{proj}"
        assert torch.equal(out[f"{prefix}.weight"].view(torch.uint8), w[i * d:(i + 1) * d].view(torch.uint8))
        assert torch.equal(out[f"{prefix}.bias"], bias[i * d:(i + 1) * d])
        assert out[f"{prefix}.weight_scale"].item() == 0.5  # shared by the fused layer: copied
        assert out[f"{prefix}.input_scale"].item() == pytest.approx([0.1, 0.2, 0.3][i])  # per shard: split
    assert torch.equal(out["transformer_blocks.0.attn.to_q.weight"].view(torch.uint8), w[:d].view(torch.uint8))
