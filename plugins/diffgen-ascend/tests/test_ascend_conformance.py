"""diffgen's conformance suite (diffgen.testing.conformance) against this plugin, with
msmodelslim fixtures written from the format definition (msmodelslim_writer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import diffgen_ascend.plugin
from diffgen.testing.conformance import PluginConformance
from msmodelslim_writer import write_msmodelslim


def _writer(scheme: str):
    def write(src: Path, dst: Path) -> None:
        import diffusers

        cls = getattr(diffusers, json.loads((Path(src) / "config.json").read_text())["_class_name"])
        model = cls.from_pretrained(src, torch_dtype=torch.float32)
        write_msmodelslim(model, Path(dst), scheme, smooth=("transformer_blocks.0.attn.to_q",))

    return write


class TestAscendConformance(PluginConformance):
    plugin = diffgen_ascend.plugin
    plugin_name = "ascend"
    fixture_writers = {"msmodelslim-w8a8": _writer("W8A8"), "msmodelslim-w4a4-mxfp4": _writer("W4A4_MXFP4")}
    online_methods = ("mxfp8", "mxfp4_npu")
    # W4A4 (FP4 weights and activations) keeps ~0.9995 of the tiny FLUX.1's output (test_ascend_methods).
    reference_min_cosine = 0.995
