"""diffgen.load_pipeline returns a real diffusers pipeline whose transformer diffgen loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

import diffgen
from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear
from diffgen.tiny.pipelines import build_tiny_pipeline


@pytest.fixture(scope="module")
def flux_pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("pipe") / "flux", seed=0)


def _image(pipe, seed=0):
    out = pipe("a red fox", height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0], dtype=np.float64)


def test_16bit_pipeline_matches_diffusers(flux_pipeline_dir):
    ours = diffgen.load_pipeline(flux_pipeline_dir, dtype=torch.float32)
    theirs = DiffusionPipeline.from_pretrained(flux_pipeline_dir, torch_dtype=torch.float32)
    for p in theirs.transformer.parameters():  # see test_loader: CPU GEMMs depend on alignment
        p.data = p.data.clone()
    assert isinstance(ours, FluxPipeline)
    assert np.array_equal(_image(ours), _image(theirs))


def test_fp8_pipeline(flux_pipeline_dir):
    pipe = diffgen.load_pipeline(flux_pipeline_dir, quantization="fp8", dtype=torch.float32)
    assert isinstance(pipe, FluxPipeline)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    reference = _image(diffgen.load_pipeline(flux_pipeline_dir, dtype=torch.float32))
    other_seed = _image(diffgen.load_pipeline(flux_pipeline_dir, dtype=torch.float32), seed=1)
    quantized = _image(pipe)
    # The fp8 image must be far closer to the 16-bit image of the same seed than another seed is.
    assert np.abs(quantized - reference).mean() < 0.25 * np.abs(other_seed - reference).mean()


def test_unknown_component_and_missing_model_index(flux_pipeline_dir, tmp_path):
    with pytest.raises(DiffgenError, match="unknown component 'transformer_2'"):
        diffgen.load_pipeline(flux_pipeline_dir, component_paths={"transformer_2": tmp_path})
    with pytest.raises(DiffgenError, match="no model_index.json"):
        diffgen.load_pipeline(tmp_path)
