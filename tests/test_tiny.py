"""The tiny transformers and pipelines that other tests and the offline default model stand on."""

from __future__ import annotations

import hashlib
import json
import time
import types
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from diffgen.tiny import pipelines as tiny_pipelines
from diffgen.tiny import (
    EMBEDDED_DEFAULT_VERSION,
    TINY_PIPELINE_FAMILIES,
    TINY_TRANSFORMERS,
    build_tiny_pipeline,
    embedded_default_pipeline,
    linear_shape_exceptions,
    save_tiny_transformer,
    tiny_transformer,
    tiny_transformer_inputs,
)

TRANSFORMER_FAMILIES = sorted(TINY_TRANSFORMERS)
VIDEO_FAMILIES = {"wan", "wan_ti2v", "wan_i2v", "hunyuan_video"}
IMAGE_INPUT_FAMILIES = {"wan_i2v", "qwen_image_edit"}
PIPELINE_TRANSFORMER = {"qwen_image_edit": "qwen_image"}  # the edit pipeline has qwen_image's components


def _forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs, return_dict=False)[0]
    return torch.stack(output) if isinstance(output, list) else output  # Z-Image returns a list


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype, name
        assert torch.equal(state_a[name], state_b[name]), name


def _file_digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_tiny_transformer_forwards_deterministically(family):
    model = tiny_transformer(family, seed=0)
    output = _forward(model, tiny_transformer_inputs(family, model, batch=2))
    again = tiny_transformer(family, seed=0)
    other_seed = tiny_transformer(family, seed=1)

    assert output.shape[0] == 2 and torch.isfinite(output).all()
    assert torch.equal(output, _forward(again, tiny_transformer_inputs(family, again, batch=2)))
    assert not torch.equal(output, _forward(other_seed, tiny_transformer_inputs(family, other_seed, batch=2)))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert linear_shape_exceptions(model) == []  # FP8 / NVFP4 GEMMs need K and N % 16 == 0


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_saved_tiny_transformer_loads_identically(family, tmp_path):
    path = save_tiny_transformer(family, tmp_path, seed=0)  # bf16, the dtype checkpoints ship in
    config = json.loads((path / "config.json").read_text())
    assert config["_class_name"] == TINY_TRANSFORMERS[family]["class_name"]
    assert (path / "diffusion_pytorch_model.safetensors").is_file()

    model_cls = getattr(diffusers, config["_class_name"])
    loaded = model_cls.from_pretrained(path, torch_dtype=torch.bfloat16)
    original = tiny_transformer(family, seed=0, dtype=torch.bfloat16)
    # Same tensors, including Wan's fp32 _keep_in_fp32_modules, so the outputs match bit for bit.
    _assert_same_state(original, loaded)
    assert torch.equal(
        _forward(original, tiny_transformer_inputs(family, original)),
        _forward(loaded, tiny_transformer_inputs(family, loaded)),
    )


def _generate(pipe, family: str) -> np.ndarray:
    kwargs = dict(
        prompt="a red cube on a table", height=32, width=32, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    if family in VIDEO_FAMILIES:
        kwargs.update(num_frames=5, output_type="np")
    if family in IMAGE_INPUT_FAMILIES:
        kwargs["image"] = PIL.Image.new("RGB", (32, 32), (200, 40, 40))
    output = pipe(**kwargs)
    if family in VIDEO_FAMILIES:
        frames = output.frames[0]
        assert frames.shape == (5, 32, 32, 3)
        return frames
    image = output.images[0]
    assert isinstance(image, PIL.Image.Image) and image.size == (32, 32)
    return np.asarray(image)


@pytest.mark.parametrize("family", TINY_PIPELINE_FAMILIES)
def test_tiny_pipeline_builds_reproducibly_and_generates(family, tmp_path, monkeypatch):
    first = build_tiny_pipeline(family, tmp_path / "first", seed=0)
    second = build_tiny_pipeline(family, tmp_path / "second", seed=0)
    digests = _file_digests(first)
    assert "model_index.json" in digests
    assert digests == _file_digests(second)

    if family == "wan_i2v" and not diffusers.utils.is_ftfy_available():
        # diffusers 0.42.1's WanImageToVideoPipeline calls ftfy.fix_text without the
        # is_ftfy_available() guard that WanPipeline has; stand in an identity fix_text.
        from diffusers.pipelines.wan import pipeline_wan_i2v

        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)

    pipe = diffusers.DiffusionPipeline.from_pretrained(first)
    pipe.set_progress_bar_config(disable=True)
    _assert_same_state(pipe.transformer, tiny_transformer(PIPELINE_TRANSFORMER.get(family, family), seed=0))

    pixels = _generate(pipe, family)
    assert np.isfinite(pixels).all() and pixels.std() > 0  # NaN latents decode to a flat image
    assert np.array_equal(pixels, _generate(pipe, family))


def test_pipeline_seed_changes_the_weights(tmp_path):
    name = "transformer/diffusion_pytorch_model.safetensors"
    zero = _file_digests(build_tiny_pipeline("flux1", tmp_path / "zero", seed=0))
    one = _file_digests(build_tiny_pipeline("flux1", tmp_path / "one", seed=1))
    assert zero[name] != one[name]
    assert zero["tokenizer/tokenizer.json"] == one["tokenizer/tokenizer.json"]


def test_embedded_default_pipeline_is_built_once_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGEN_CACHE_DIR", str(tmp_path))
    path = embedded_default_pipeline()
    assert path == tmp_path / f"default-model-{EMBEDDED_DEFAULT_VERSION}"
    built_at = (path / "model_index.json").stat().st_mtime_ns

    assert embedded_default_pipeline() == path
    assert (path / "model_index.json").stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging directory left behind

    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    image = pipe("a lighthouse", height=64, width=64, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert time.perf_counter() - start < 30  # the brief for a 2-core CPU; it takes ~0.1 s


def test_embedded_default_pipeline_survives_losing_the_rename_race(tmp_path, monkeypatch):
    target = tmp_path / f"default-model-{EMBEDDED_DEFAULT_VERSION}"
    build = tiny_pipelines.build_tiny_pipeline

    def build_while_another_process_finishes_first(family, directory, seed=0):
        build(family, target, seed)
        return build(family, directory, seed)

    monkeypatch.setattr(tiny_pipelines, "build_tiny_pipeline", build_while_another_process_finishes_first)
    assert embedded_default_pipeline(tmp_path) == target
    assert (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_interrupted_embedded_default_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(family, directory, seed=0):
        (Path(directory) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_pipelines, "build_tiny_pipeline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_default_pipeline(tmp_path)
    assert list(tmp_path.iterdir()) == []
