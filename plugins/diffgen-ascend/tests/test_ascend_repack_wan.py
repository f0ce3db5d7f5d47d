"""``diffgen repack wan``: both argument forms, the cascade experts, the renames (Wan's originals,
the norm2/norm3 swap, ``.linear.``/``.div.``), atomic writes; and the generic ``diffgen repack``
on an msmodelslim checkpoint in Wan's original names."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import diffgen
from diffgen.cli import main
from diffgen.tiny.pipelines import build_tiny_pipeline
from diffgen.tiny.transformers import tiny_transformer, tiny_transformer_inputs
from ascend_layers import cosine, run
from msmodelslim_writer import emulate, write_msmodelslim

SMOOTHED = ("blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj")
# diffusers -> Wan's original names, written here independently of diffgen_ascend.names.
TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def to_original(name: str) -> str:
    for pattern, replacement in TO_ORIGINAL:
        new, n = re.subn(pattern, replacement, name)
        if n:
            return new
    return name


def write_expert(model, directory, scheme="W8A8_DYNAMIC"):
    layers = write_msmodelslim(model, directory, scheme, smooth=SMOOTHED, rename=to_original)
    (directory / "config.json").unlink()  # msmodelslim copies Wan's own config, not diffusers'
    return layers


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    """A tiny Wan2.2 T2V-A14B pipeline (two experts) and msmodelslim output for both experts."""
    root = tmp_path_factory.mktemp("wan")
    pipeline = build_tiny_pipeline("wan", root / "pipeline", seed=0)
    quant = root / "quant"
    experts = {"transformer": ("high_noise_model", 0), "transformer_2": ("low_noise_model", 4)}
    layers = {c: write_expert(tiny_transformer("wan", seed=seed), quant / folder)
              for c, (folder, seed) in experts.items()}
    return pipeline, quant, layers


def test_the_msmodelslim_output_really_is_in_original_names(t2v):
    _, quant, _ = t2v
    names = set(load_file(next((quant / "high_noise_model").glob("*.safetensors"))))
    assert {"blocks.0.self_attn.q.linear.weight", "blocks.0.self_attn.q.div.mul_scale", "blocks.0.norm3.weight",
            "blocks.0.ffn.0.linear.weight_scale", "head.head.weight", "time_embedding.0.weight"} <= names
    assert not any(".attn1." in n or ".norm2." in n for n in names)


def test_new_form_writes_a_loadable_cascade_pipeline(t2v, tmp_path):
    pipeline, quant, layers = t2v
    out = tmp_path / "repacked"
    assert main(["repack", "wan", "--model-type", "Wan2.2-T2V-A14B", "--original-model-path", str(pipeline),
                 "--quant-path", str(quant), "--output-path", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "vae").is_dir() and (out / "text_encoder").is_dir()
    assert not list(tmp_path.glob(".repacked*"))  # no staging folder left
    for component, seed in (("transformer", 0), ("transformer_2", 4)):
        folder = out / component
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                            "quant_model_description.json"]
        tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
        sixteen = tiny_transformer("wan", seed=seed)
        # the swap: Wan's norm3 (cross-attention norm, affine) is diffusers' norm2
        assert torch.equal(tensors["blocks.0.norm2.weight"], sixteen.blocks[0].norm2.weight)
        assert "blocks.0.attn1.to_q.mul_scale" in tensors and "blocks.0.ffn.net.0.proj.weight_scale" in tensors
        assert not any(".linear." in n or ".div." in n for n in tensors)
        description = json.loads((folder / "quant_model_description.json").read_text())
        assert description["blocks.0.attn1.to_q.weight"] == "W8A8_DYNAMIC"
        assert description["blocks.0.attn1.to_q.mul_scale"] == "FLOAT"
        model = diffgen.load_transformer(folder, device="cpu", dtype=torch.float32)
        reference = emulate(tiny_transformer("wan", seed=seed), layers[component])
        inputs = tiny_transformer_inputs("wan", sixteen, seed=1)
        assert cosine(run(model, inputs), run(reference, inputs)) >= 1 - 1e-6  # see test_ascend_methods


def test_old_form_writes_one_transformer(t2v, tmp_path):
    pipeline, quant, layers = t2v
    out = tmp_path / "old"
    assert main(["repack", "wan", "--input-path", str(quant / "high_noise_model"), "--output-path", str(out)]) == 0
    model = diffgen.load_transformer(pipeline / "transformer", weights_path=out, device="cpu", dtype=torch.float32)
    assert model.diffgen_plan.claim.plugin == "ascend"
    inputs = tiny_transformer_inputs("wan", tiny_transformer("wan"), seed=2)
    reference = emulate(tiny_transformer("wan", seed=0), layers["transformer"])
    assert cosine(run(model, inputs), run(reference, inputs)) >= 1 - 1e-6


def test_ti2v_is_one_transformer_and_convert_reaches_the_same_converter(tmp_path):
    pipeline = build_tiny_pipeline("wan_ti2v", tmp_path / "pipeline", seed=0)
    write_expert(tiny_transformer("wan_ti2v", seed=0), tmp_path / "quant", "W8A8_MXFP8")
    out = tmp_path / "out"
    assert main(["convert", "wan", "--model-type", "Wan2.2-TI2V-5B", "--original-model-path", str(pipeline),
                 "--quant-path", str(tmp_path / "quant"), "--output-path", str(out)]) == 0
    assert not (out / "transformer_2").exists()
    assert diffgen.load_transformer(out / "transformer", device="cpu").diffgen_plan.config.scheme == "W8A8_MXFP8"


def test_a_failure_leaves_nothing_behind(t2v, tmp_path, capsys):
    pipeline, quant, _ = t2v
    broken = tmp_path / "quant"
    shutil.copytree(quant, broken)
    description = next((broken / "low_noise_model").glob("quant_model_description*.json"))
    d = json.loads(description.read_text())
    d["blocks.0.self_attn.q.linear.weight"] = "W8A8"  # the tensors say W8A8_DYNAMIC
    description.write_text(json.dumps(d))
    out = tmp_path / "out"
    assert main(["repack", "wan", "--model-type", "Wan2.2-T2V-A14B", "--original-model-path", str(pipeline),
                 "--quant-path", str(broken), "--output-path", str(out)]) == 2
    assert "needs tensor blocks.0.attn1.to_q.quant_bias" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quant"]


def test_arguments_are_checked(t2v, tmp_path, capsys):
    pipeline, quant, _ = t2v
    assert main(["repack", "wan", "--model-type", "Wan2.2-T2V-A14B", "--output-path", str(tmp_path / "o")]) == 2
    assert "give --model-type, --original-model-path and --quant-path" in capsys.readouterr().err
    assert main(["repack", "wan", "--model-type", "Wan2.2-TI2V-5B", "--original-model-path", str(pipeline),
                 "--quant-path", str(quant), "--output-path", str(tmp_path / "o")]) == 2
    assert "has no quant_model_weight*.safetensors" in capsys.readouterr().err


def test_diffusers_named_input_is_refused(tmp_path, capsys):
    write_msmodelslim(tiny_transformer("wan", seed=0), tmp_path / "quant", "W8A8_DYNAMIC")
    assert main(["repack", "wan", "--input-path", str(tmp_path / "quant"), "--output-path", str(tmp_path / "o")]) == 2
    assert "in diffusers' names already" in capsys.readouterr().err


def test_generic_repack_of_an_original_named_checkpoint(t2v, tmp_path):
    """With the diffusers config beside it, the original-named msmodelslim output loads as it is
    (the plugin renames while streaming), and `diffgen repack SRC DST` writes the runtime names."""
    pipeline, quant, layers = t2v
    src = tmp_path / "src"
    shutil.copytree(quant / "high_noise_model", src)
    shutil.copyfile(pipeline / "transformer" / "config.json", src / "config.json")
    direct = diffgen.load_transformer(src, device="cpu", dtype=torch.float32)
    assert main(["repack", str(src), str(tmp_path / "dst")]) == 0
    written = load_file(next((tmp_path / "dst").glob("*.safetensors")))
    assert "blocks.0.attn1.to_q.mul_scale" in written and "blocks.0.norm2.weight" in written
    repacked = diffgen.load_transformer(tmp_path / "dst", device="cpu", dtype=torch.float32)
    inputs = tiny_transformer_inputs("wan", tiny_transformer("wan"), seed=3)
    reference = emulate(tiny_transformer("wan", seed=0), layers["transformer"])
    for model in (direct, repacked):
        assert cosine(run(model, inputs), run(reference, inputs)) >= 1 - 1e-6


def test_every_wan_name_round_trips():
    """diffusers -> original (this file's table) -> diffusers (the plugin's rules), for every tensor
    of the tiny Wan and the I2V-14B image-branch names the tiny model lacks."""
    from diffgen_ascend.names import is_wan_original_name, wan_original_to_diffusers_name

    names = list(tiny_transformer("wan").state_dict())
    extra = {"img_emb.proj.0.weight": "condition_embedder.image_embedder.norm1.weight",
             "img_emb.proj.1.weight": "condition_embedder.image_embedder.ff.net.0.proj.weight",
             "img_emb.proj.3.bias": "condition_embedder.image_embedder.ff.net.2.bias",
             "img_emb.proj.4.weight": "condition_embedder.image_embedder.norm2.weight",
             "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
             "blocks.3.cross_attn.k_img.weight": "blocks.3.attn2.add_k_proj.weight",
             "blocks.3.cross_attn.v_img.bias": "blocks.3.attn2.add_v_proj.bias",
             "blocks.3.cross_attn.norm_k_img.weight": "blocks.3.attn2.norm_added_k.weight"}
    for name in names:
        original = to_original(name)
        assert wan_original_to_diffusers_name(original) == name, original
        assert is_wan_original_name(original) == (original != name and original != "patch_embedding.weight"), original
    for original, name in extra.items():
        assert wan_original_to_diffusers_name(original) == name and is_wan_original_name(original)


def test_an_existing_path_named_like_a_converter_is_a_checkpoint(flux_checkpoints, tmp_path, monkeypatch):
    """`diffgen repack wan DST` with a folder ./wan repacks that folder: a path wins over a converter."""
    shutil.copytree(flux_checkpoints["W8A8_DYNAMIC"][0], tmp_path / "wan")
    monkeypatch.chdir(tmp_path)
    assert main(["repack", "wan", "out", "--overwrite"]) == 0
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
