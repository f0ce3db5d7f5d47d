"""diffgen's conformance suite (diffgen.testing.conformance) against this plugin, with a Quark
MXFP4 fixture written from the format definition (diffgen_rocm.quark_fixture)."""

from __future__ import annotations

import diffgen_rocm.plugin
from diffgen.testing.conformance import PluginConformance
from diffgen_rocm.quark_fixture import write_quark_mxfp4


class TestRocmConformance(PluginConformance):
    plugin = diffgen_rocm.plugin
    plugin_name = "rocm"
    fixture_writers = {"quark-mxfp4": write_quark_mxfp4}
    online_methods = ("mxfp4",)
    # Online MXFP4 keeps linears with fewer than 256 outputs 16-bit; of the tiny families only
    # Z-Image (SwiGLU hidden 256) has such linears outside the embedders, so online runs quantize.
    family = "z_image"
    # W4A4 MXFP4 keeps 0.9996-0.9999 of the tiny models' output (test_quark); margin for other seeds.
    reference_min_cosine = 0.995
