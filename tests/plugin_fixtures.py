"""Third-party plugins installed the way pip would leave them, and a tiny FLUX checkpoint.

A "distribution" here is what a wheel unpacks to in site-packages: the plugin package beside a
``<dist>-0.1.dist-info/`` folder whose ``entry_points.txt`` names it in group ``diffgen``. Putting
the folder on ``sys.path`` is all ``importlib_metadata`` needs to find the entry point.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.linear import LinearMethod
from diffgen.quant import LayerSpec, QuantConfig

# -- plugin sources ---------------------------------------------------------------------------
GOOD = '''
"""Claims quant_method "toy"; its only method is a plain 16-bit linear, so results are exact."""
import torch.nn.functional as F

from diffgen import hookimpl
from diffgen.linear import LinearMethod, register_weight
from diffgen.quant import QuantClaim, QuantConfig


class ToyReferenceMethod(LinearMethod):
    name = "toy-reference"
    kind = "reference"

    def create_weights(self, layer, in_features, out_features, dtype):
        register_weight(layer, "weight", (out_features, in_features), dtype)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


@hookimpl
def detect_quant_config(source):  # a subset of the spec's arguments is allowed
    qc = source.config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "toy":
        return QuantClaim(QuantConfig.make("toy"), 10, "config.json quantization_config.quant_method=toy")
    return None


@hookimpl
def create_linear_method(config, layer):
    return ToyReferenceMethod(config, layer) if config.family == "toy" else None
'''

IMPORT_FAILS = '''
raise ImportError("libtoy.so not found\\nsecond line of the loader's complaint")
'''

DETECT_RAISES = '''
from diffgen import hookimpl


@hookimpl
def detect_quant_config(source, request):
    raise RuntimeError("toy detector crashed\\nsecond line that must not reach the report")
'''

MISSPELLED_HOOK = '''
from diffgen import hookimpl


@hookimpl
def detect_quant_cofnig(source, request):
    return None
'''

EXTRA_ARGUMENT = '''
from diffgen import hookimpl


@hookimpl
def create_linear_method(config, layer, platform, device):
    return None
'''


EXTENDING = '''
"""Implements no hook: publishes a converter and rewrites, through entry points alone."""
from diffgen.rewrites import BlockRewrite
from diffgen.tools.convert import Converter

CALLS = []


def convert_main(argv):
    CALLS.append(("convert", list(argv)))
    return 0


CONVERTER = Converter(summary="a toy converter that records its arguments", main=convert_main)


class CountingFeedForward:
    """diffusers' forward, counted: the rewritten model must give the same numbers."""

    def forward(self, hidden_states, *args, **kwargs):
        CALLS.append(("feed-forward", tuple(hidden_states.shape)))
        return super().forward(hidden_states, *args, **kwargs)


class CountFeedForward(BlockRewrite):
    name = "toy-count-ff"
    block_class = "FeedForward"
    forward_mixin = CountingFeedForward

    def rewrite(self, module, platform):
        return None if hasattr(module, "net") else "not diffusers' FeedForward"


class Raises(BlockRewrite):
    name = "toy-raises"
    block_class = "FluxAttention"

    def rewrite(self, module, platform):
        raise RuntimeError("toy rewrite crashed\\nsecond line")


REWRITES = [CountFeedForward(), Raises()]
'''


@dataclass(frozen=True)
class ToyPlugin:
    entry_point: str  # the plugin's name in diffgen
    distribution: str
    module: str
    source: str
    extensions: tuple[tuple[str, str, str], ...] = ()  # (entry-point group, name, attribute)


GOOD_PLUGIN = ToyPlugin("good", "diffgen-toy-good", "diffgen_toy_good", GOOD)
IMPORT_FAILS_PLUGIN = ToyPlugin("import_fails", "diffgen-toy-import-fails", "diffgen_toy_import_fails",
                                IMPORT_FAILS)
DETECT_RAISES_PLUGIN = ToyPlugin("detect_raises", "diffgen-toy-detect-raises", "diffgen_toy_detect_raises",
                                 DETECT_RAISES)
MISSPELLED_PLUGIN = ToyPlugin("misspelled", "diffgen-toy-misspelled", "diffgen_toy_misspelled",
                              MISSPELLED_HOOK)
EXTRA_ARGUMENT_PLUGIN = ToyPlugin("extra_argument", "diffgen-toy-extra-argument", "diffgen_toy_extra_argument",
                                  EXTRA_ARGUMENT)
BROKEN_PLUGINS = (IMPORT_FAILS_PLUGIN, DETECT_RAISES_PLUGIN, MISSPELLED_PLUGIN, EXTRA_ARGUMENT_PLUGIN)
EXTENDING_PLUGIN = ToyPlugin("extending", "diffgen-toy-extending", "diffgen_toy_extending", EXTENDING,
                             (("diffgen.converters", "toy-convert", "CONVERTER"), ("diffgen.rewrites", "toy", "REWRITES")))


def install_distribution(site: Path, plugin: ToyPlugin) -> None:
    """Write ``plugin`` under ``site`` as an unpacked wheel would be."""
    package = site / plugin.module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(plugin.source).lstrip())
    dist_info = site / f"{plugin.distribution.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {plugin.distribution}\nVersion: 0.1\n")
    groups = {"diffgen": [f"{plugin.entry_point} = {plugin.module}"]}
    for group, name, attribute in plugin.extensions:
        groups.setdefault(group, []).append(f"{name} = {plugin.module}:{attribute}")
    (dist_info / "entry_points.txt").write_text("".join(f"[{g}]\n" + "\n".join(lines) + "\n\n"
                                                        for g, lines in groups.items()))


# -- hand-made claims and offers --------------------------------------------------------------
LAYER = LayerSpec("transformer_blocks.0.attn.to_q", 32, 32, True, torch.bfloat16)


def offer(plugin: str, name: str, kind: str, unavailable: str | None = None,
          config: QuantConfig | None = None) -> tuple[str, LinearMethod]:
    """A (plugin, LinearMethod) pair as ``PluginHost.create_linear_method`` returns them."""
    cls = type(name, (LinearMethod,), {"name": name, "kind": kind})
    return plugin, cls(config or QuantConfig("fp8"), LAYER, unavailable_reason=unavailable)


# -- a tiny 16-bit checkpoint -----------------------------------------------------------------
def save_tiny_flux(path: Path) -> Path:
    """A FluxTransformer2DModel with the real Linear names and ~60k parameters, saved in bf16."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))
    for param in model.parameters():  # model.to(dtype) would warn about fp32 modules; FLUX has none
        param.data = param.data.to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def tiny_flux_inputs(batch: int = 1, height: int = 4, width: int = 4, text: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    seq = height * width
    rows, cols = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(seq, 3)
    return {
        "hidden_states": torch.randn(batch, seq, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
    }
