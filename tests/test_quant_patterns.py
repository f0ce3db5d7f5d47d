"""The two pattern languages of diffgen.quant, table by table.

User patterns (``--quantization-ignored-layers``) match by containment, as SGLang-Diffusion documents; checkpoint ignore
lists are case-sensitive globs on the full module name. Names are real diffusers FLUX names.
"""

from __future__ import annotations

import pytest

from diffgen.quant import QuantConfig, layer_group, matches_glob, matches_user_pattern


@pytest.mark.parametrize("pattern, name, expected", [
    # SGLang-Diffusion's documented rule: the layer's name contains the pattern
    ("img_mod", "transformer_blocks.3.img_mod", True),
    ("img_mod", "transformer_blocks.3.img_mod.1", True),
    ("img_mod", "transformer_blocks.3.img_modulation", True),
    ("attn.to_", "transformer_blocks.0.attn.to_q", True),     # the docs' own example
    ("attn.to_", "transformer_blocks.0.attn.to_out.0", True),
    ("attn.to_", "transformer_blocks.0.attn.add_q_proj", False),
    ("mlp.gate", "mlp.gate_up_proj", True),
    ("transformer_blocks.3", "single_transformer_blocks.3.attn.to_q", True),
    ("transformer_blocks.3", "transformer_blocks.30.attn.to_q", True),
    ("transformer_blocks.3.", "transformer_blocks.30.attn.to_q", False),  # a trailing dot stops at the block
    ("transformer_blocks.3.", "transformer_blocks.3.attn.to_q", True),
    ("proj_out.", "proj_out", True),  # the name ends where the pattern's dot would be
    ("proj_out", "single_transformer_blocks.0.proj_out", True),
    ("Proj_out", "proj_out", False),  # case-sensitive
    # a wildcard makes it a glob on the full name (containment never matched a '*')
    ("transformer_blocks.*.attn.to_q", "transformer_blocks.0.attn.to_q", True),
    ("transformer_blocks.*.attn.to_q", "single_transformer_blocks.0.attn.to_q", False),
    ("*.attn.to_?", "transformer_blocks.0.attn.to_k", True),
    ("*.attn.to_?", "transformer_blocks.0.attn.to_out.0", False),
])
def test_user_pattern(pattern, name, expected):
    assert matches_user_pattern(pattern, name) is expected


@pytest.mark.parametrize("pattern, name, expected", [
    ("transformer_blocks.*.norm1.linear", "transformer_blocks.12.norm1.linear", True),
    ("transformer_blocks.*.norm1.linear", "single_transformer_blocks.12.norm1.linear", False),  # anchored
    ("proj_out", "proj_out", True),
    ("proj_out", "single_transformer_blocks.0.proj_out", False),  # no wildcard: the full name only
    ("*proj_out*", "proj_out", True),
    ("*proj_out*", "single_transformer_blocks.0.proj_out", True),
    ("Proj_out", "proj_out", False),  # case-sensitive on every OS (fnmatchcase, not fnmatch)
    ("transformer_blocks.[0-1].attn.to_q", "transformer_blocks.1.attn.to_q", True),
    ("transformer_blocks.[0-1].attn.to_q", "transformer_blocks.2.attn.to_q", False),
])
def test_glob(pattern, name, expected):
    assert matches_glob(pattern, name) is expected


@pytest.mark.parametrize("user_ignore, ignore, layer, expected", [
    # the user's pattern is the answer whenever both would keep the layer 16-bit
    (("proj_out",), ("*proj_out*",), "proj_out", ("user", "proj_out")),
    (("proj_out",), ("*proj_out*",), "single_transformer_blocks.0.proj_out", ("user", "proj_out")),
    (("img_mod",), ("*proj_out*",), "proj_out", ("checkpoint", "*proj_out*")),
    (("img_mod",), ("*proj_out*",), "transformer_blocks.0.img_mod.1", ("user", "img_mod")),
    (("img_mod",), ("*proj_out*",), "transformer_blocks.0.attn.to_q", None),
    # the first matching user pattern is the one reported
    (("transformer_blocks.0", "attn"), (), "transformer_blocks.0.attn.to_q", ("user", "transformer_blocks.0")),
    # a user pattern with a wildcard is a glob on the full name (containment never matched '*')
    (("*proj_out*",), (), "proj_out", ("user", "*proj_out*")),
    (("transformer_blocks.*.proj_out",), (), "single_transformer_blocks.0.proj_out", None),
    ((), ("proj_out",), "single_transformer_blocks.0.proj_out", None),
    ((), (), "proj_out", None),
])
def test_ignored_by(user_ignore, ignore, layer, expected):
    config = QuantConfig.make("fp8", ignore=ignore, user_ignore=user_ignore)
    assert config.ignored_by(layer) == expected


@pytest.mark.parametrize("name, group", [
    ("transformer_blocks.12.attn.to_q", "transformer_blocks.*.attn.to_q"),
    ("transformer_blocks.3.img_mod.1", "transformer_blocks.*.img_mod.*"),
    ("single_transformer_blocks.0.proj_out", "single_transformer_blocks.*.proj_out"),
    ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.*.ff.net.*.proj"),
    ("0.attn.to_q", "*.attn.to_q"),
    ("proj_out", "proj_out"),
    ("blocks.1.fc1", "blocks.*.fc1"),    # digits inside a component stay
    ("layer2.10a.x", "layer2.10a.x"),
])
def test_layer_group(name, group):
    assert layer_group(name) == group


def test_default_online_ignores_are_anchored_to_the_full_name():
    """`proj_out` is FLUX's final projection; the single blocks' proj_out are 30% of the FLOPs
    and must be quantized."""
    from diffgen.quant import default_online_ignore

    assert default_online_ignore("FluxTransformer2DModel", "proj_out") == "proj_out"
    assert default_online_ignore("FluxTransformer2DModel", "norm_out.linear") == "norm_out.*"
    assert default_online_ignore("FluxTransformer2DModel", "single_transformer_blocks.3.proj_out") is None
    assert default_online_ignore("FluxTransformer2DModel", "transformer_blocks.0.norm1.linear") is None
    assert default_online_ignore("UnknownModel", "proj_out") is None
