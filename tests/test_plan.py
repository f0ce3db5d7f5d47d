"""One plan for load, inspect, quantize and repack (diffgen.plan), with the platform and dtype
resolved once: what ``diffgen inspect`` prints is what ``diffgen generate`` runs on that machine."""

from __future__ import annotations

import json

import pytest
import torch

import diffgen.loader
import diffgen.platform
from diffgen.cli import main
from diffgen.platform import resolve
from diffgen.quant import layer_group
from diffgen.testing.conformance_fixtures import FAKE_PLATFORMS
from diffgen.tiny.pipelines import build_tiny_pipeline

H100 = FAKE_PLATFORMS["cuda-sm90"]


class PlanSeen(BaseException):
    """Raised where the loader would start moving weights to a GPU this machine does not have (a
    BaseException, so the CLI's handler of internal errors lets it through)."""


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("plan") / "flux1", seed=0)


def test_auto_dtype_follows_the_platform():
    assert resolve(FAKE_PLATFORMS["cpu"]) == (FAKE_PLATFORMS["cpu"], torch.float32)
    assert resolve(H100, "auto") == (H100, torch.bfloat16)
    assert resolve(H100, "fp16")[1] == torch.float16 and resolve(H100, torch.float32)[1] == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int7'"):
        resolve(H100, "int7")


def test_inspect_shows_what_generate_runs_on_a_cuda_machine(pipeline_dir, monkeypatch, capsys):
    """On a (described) H100 with no --device or --dtype, inspect and generate both plan bf16 and the
    native fp8-scaled-mm method; inspect once planned fp32 and the reference method here."""
    monkeypatch.setattr(diffgen.platform, "detect_platform", lambda device=None: H100)
    assert main(["inspect", str(pipeline_dir), "--quantization", "fp8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["transformer"]

    seen = {}

    def stop_before_weights_move(planned, **kwargs):
        seen["plan"] = planned
        raise PlanSeen

    monkeypatch.setattr(diffgen.loader, "load_weights", stop_before_weights_move)
    with pytest.raises(PlanSeen):
        main(["generate", "--model-path", str(pipeline_dir), "--quantization", "fp8", "--prompt", "x", "--quiet",
              "--no-save-output"])
    planned = seen["plan"]
    assert report["platform"] == planned.platform.to_dict() == H100.to_dict()
    assert report["dtype"] == "bfloat16" and planned.dtype == torch.bfloat16
    methods = {g["pattern"]: g["method"] for g in report["groups"]}
    assert methods == {layer_group(d.layer.name): d.method.name if d.method else None for d in planned.decisions}
    assert methods["transformer_blocks.*.attn.to_q"] == "fp8-scaled-mm"


@pytest.mark.parametrize("key, value", [
    ("num_layers", None), ("num_layers", -1), ("num_layers", 10 ** 9), ("num_attention_heads", 2.5),
    ("attention_head_dim", float("nan")), ("axes_dims_rope", [4, -2, 2]), ("axes_dims_rope", "4,6,6"),
    ("joint_attention_dim", True),
])
def test_config_sizes_are_checked_before_the_model_is_built(flux_dir, tmp_path, key, value, capsys):
    from diffgen.errors import LoadError

    ckpt = tmp_path / "t"
    ckpt.mkdir()
    (ckpt / "diffusion_pytorch_model.safetensors").symlink_to(flux_dir / "diffusion_pytorch_model.safetensors")
    config = json.loads((flux_dir / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(LoadError, match=f"^config.json {key}="):
        diffgen.inspect(ckpt, device="cpu")
    assert main(["inspect", str(ckpt)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("class_name", ["FluxPipeline", "utils", "AutoencoderKL ", "__version__"])
def test_class_name_must_be_a_diffusers_model(flux_dir, tmp_path, class_name):
    from diffgen.errors import LoadError

    ckpt = tmp_path / "t"
    ckpt.mkdir()
    (ckpt / "diffusion_pytorch_model.safetensors").symlink_to(flux_dir / "diffusion_pytorch_model.safetensors")
    config = json.loads((flux_dir / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "_class_name": class_name}))
    with pytest.raises(LoadError, match="not a diffusers model class"):
        diffgen.inspect(ckpt, device="cpu")
