"""The plugin's tests run with diffgen's builtin plugins and this one (and diffgen-cuda where a
test names it), nothing else. When diffgen-ascend is not installed (no entry point) the plugin
module is registered directly; test_packaging checks the entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from diffgen.plugins import reset_plugins
from diffgen.testing.host import only_plugin

sys.path.insert(0, str(Path(__file__).parent))  # msmodelslim_writer, fake_torch_npu, ascend_layers


@pytest.fixture(autouse=True)
def ascend_plugin_only(monkeypatch):
    yield only_plugin(monkeypatch, "ascend", "diffgen_ascend.plugin")
    reset_plugins()


@pytest.fixture(scope="session")
def flux_16bit(tmp_path_factory):
    """The tiny FLUX.1 transformer, fp32 on disk."""
    import torch

    from diffgen.tiny.transformers import save_tiny_transformer

    return save_tiny_transformer("flux1", tmp_path_factory.mktemp("flux16") / "transformer", seed=0,
                                 dtype=torch.float32)


SCHEMES = ("W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC", "W8A8_MXFP8", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE")
SMOOTHED = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp")


@pytest.fixture(scope="session")
def flux_checkpoints(tmp_path_factory):
    """scheme -> (folder, {layer: (type, tensors)}): the tiny FLUX.1 (seed 0) in every msmodelslim
    scheme, two layers smoothed, W8A8's static input scales from the 16-bit activations."""
    from diffgen.tiny.transformers import tiny_transformer, tiny_transformer_inputs
    from msmodelslim_writer import activation_ranges, write_msmodelslim

    root = tmp_path_factory.mktemp("flux-msmodelslim")
    model = tiny_transformer("flux1", seed=0)
    ranges = activation_ranges(model, tiny_transformer_inputs("flux1", model, seed=1))
    return {s: (root / s, write_msmodelslim(tiny_transformer("flux1", seed=0), root / s, s, smooth=SMOOTHED,
                                            x_ranges=ranges)) for s in SCHEMES}
