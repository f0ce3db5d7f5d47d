"""``diffgen repack``: a checkpoint rewritten in the runtime layout, checked, written atomically.
(SGLang-named checkpoints, where the plugins rename and split, are in diffgen-cuda's tests.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.cli import main
from diffgen.errors import DiffgenError, LoadError
from diffgen.tiny.transformers import tiny_transformer, tiny_transformer_inputs
from diffgen.tools.repack import repack
from tests.conftest import run
from tests.test_fp8 import WEIGHTS, write_fp8_checkpoint


def test_a_checkpoint_in_the_runtime_layout_comes_out_as_it_went_in(flux_dir, tmp_path, capsys):
    fp8 = write_fp8_checkpoint(flux_dir, tmp_path / "fp8", "per-tensor", "static")
    assert main(["repack", str(fp8), str(tmp_path / "out")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["format"] == "fp8" and stats["claimed_by"] == "fp8"
    before, after = load_file(fp8 / WEIGHTS), load_file(tmp_path / "out" / WEIGHTS)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        # The writer stores per-tensor scales as [1]; the runtime layout is a 0-d scalar.
        assert torch.equal(after[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
        assert after[name].dtype == tensor.dtype  # stored dtypes are kept, not cast to a compute dtype
    assert after["proj_out.weight"].dtype == torch.float32
    assert after["transformer_blocks.0.attn.to_q.weight_scale"].shape == ()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((fp8 / "config.json").read_text())
    a = diffgen.load_transformer(fp8, device="cpu", dtype=torch.float32)
    b = diffgen.load_transformer(tmp_path / "out", device="cpu", dtype=torch.float32)
    inputs = tiny_transformer_inputs("flux1", tiny_transformer("flux1", seed=0), seed=1)
    assert torch.equal(run(a, inputs), run(b, inputs))


def test_a_tensor_the_model_does_not_have_stops_it_and_nothing_is_written(flux_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(flux_dir, src)
    tensors = load_file(src / WEIGHTS)
    tensors["stray.weight"] = torch.zeros(2)
    save_file(tensors, src / WEIGHTS)
    with pytest.raises(LoadError, match=r"tensor 'stray.weight' from .*diffusion_pytorch_model.safetensors"):
        repack(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary directory

    del tensors["stray.weight"], tensors["proj_out.bias"]
    save_file(tensors, src / WEIGHTS)
    with pytest.raises(LoadError, match=r"^the checkpoint does not fit FluxTransformer2DModel: 1 tensors missing after repacking \(e.g. proj_out.bias; "):
        repack(src, tmp_path / "out")


def test_an_existing_output_is_kept_unless_asked(flux_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DiffgenError, match="exists"):
        repack(flux_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert repack(flux_dir, tmp_path / "out", overwrite=True)["format"] == "16-bit"
    assert not (tmp_path / "out" / "keep.txt").exists()
