"""Nunchaku's module names -> diffusers' module names, per model class.

Two conventions reach us. FLUX.1 files from deepcompressor use the C++ engine's names
(``qkv_proj``, ``out_proj``, ``mlp_fc1``, ``norm_q``; leaves ``smooth``, ``lora_down``,
``lora_up``); nunchaku's Python models (FLUX V2, Qwen-Image, Z-Image) use module paths
(``attn.to_qkv``, ``ff.net.2``; leaves ``smooth_factor``, ``proj_down``, ``proj_up``). A rule maps
one nunchaku module to diffusers modules:
  ``split``  the rows of a fused linear go to several diffusers linears (q, k, v; Z-Image's
             SwiGLU [w3; w1]); the input side (smoothing, proj_down) is shared, so each keeps a copy;
  ``part``   one half of FLUX single blocks' ``proj_out``, which nunchaku splits by input columns
             (attention 3072 | MLP 12288) into two linears whose outputs add;
  ``awq``    an AdaLN modulation linear stored AWQ W4A16 with rows interleaved over ``chunks``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LEAF_ALIASES = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig",
                "lora_down": "proj_down", "lora_up": "proj_up"}
SVDQ_LEAVES = ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up",
               "wcscales", "wtscale", "wzeros")
SHIFT = 0.171875  # nunchaku's SHIFT_GELU: the int4 input of an MLP's second linear is x + SHIFT, unsigned


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex on the nunchaku module name (fullmatch)
    targets: tuple[str, ...]  # re.sub templates
    kind: str = "rename"  # rename | split | part | awq
    part: int = 0  # for "part": which input slice of the target (0 = first)
    chunks: int = 0  # for "awq": modulation chunks interleaved in the rows


_QKV = tuple(f"attn.to_{x}" for x in "qkv")
_ADD_QKV = tuple(f"attn.add_{x}_proj" for x in "qkv")


def _block(prefix: str, rules: list[tuple[str, tuple[str, ...], str]]) -> list[Rule]:
    return [Rule(rf"({prefix})\.{src}", tuple(rf"\1.{t}" for t in dst), kind) for src, dst, kind in rules]


_FLUX_DOUBLE = [
    (r"(?:qkv_proj|attn\.to_qkv)", _QKV, "split"),
    (r"(?:qkv_proj_context|attn\.add_qkv_proj)", _ADD_QKV, "split"),
    (r"out_proj", ("attn.to_out.0",), "rename"),
    (r"out_proj_context", ("attn.to_add_out",), "rename"),
    (r"mlp_fc1", ("ff.net.0.proj",), "rename"),
    (r"mlp_fc2", ("ff.net.2",), "rename"),
    (r"mlp_context_fc1", ("ff_context.net.0.proj",), "rename"),
    (r"mlp_context_fc2", ("ff_context.net.2",), "rename"),
    (r"(norm_q|norm_k|norm_added_q|norm_added_k)", (r"attn.\2",), "rename"),
]
_FLUX_SINGLE = [
    (r"(?:qkv_proj|attn\.to_qkv)", _QKV, "split"),
    (r"mlp_fc1", ("proj_mlp",), "rename"),
    (r"(norm_q|norm_k)", (r"attn.\2",), "rename"),
]
_QWEN = [
    (r"attn\.to_qkv", _QKV, "split"),
    (r"attn\.add_qkv_proj", _ADD_QKV, "split"),
]
_ZIMAGE = [
    (r"attention\.to_qkv", tuple(f"attention.to_{x}" for x in "qkv"), "split"),
    # diffusers' SwiGLU computes proj(x).chunk(2): value first, gate second; Z-Image's w2(silu(w1 x) * w3 x)
    (r"feed_forward\.net\.0\.proj", ("feed_forward.w3", "feed_forward.w1"), "split"),
    (r"feed_forward\.net\.2", ("feed_forward.w2",), "rename"),
]

RULES: dict[str, list[Rule]] = {
    "FluxTransformer2DModel": [
        *_block(r"transformer_blocks\.\d+", _FLUX_DOUBLE),
        *_block(r"single_transformer_blocks\.\d+", _FLUX_SINGLE),
        Rule(r"(single_transformer_blocks\.\d+)\.(?:out_proj|attn\.to_out)", (r"\1.proj_out",), "part", part=0),
        Rule(r"(single_transformer_blocks\.\d+)\.mlp_fc2", (r"\1.proj_out",), "part", part=1),
        Rule(r"(transformer_blocks\.\d+\.norm1(?:_context)?\.linear)", (r"\1",), "awq", chunks=6),
        Rule(r"(single_transformer_blocks\.\d+\.norm\.linear)", (r"\1",), "awq", chunks=3),
    ],
    "QwenImageTransformer2DModel": [
        *_block(r"transformer_blocks\.\d+", _QWEN),
        Rule(r"(transformer_blocks\.\d+\.(?:img|txt)_mod\.1)", (r"\1",), "awq", chunks=6),
    ],
    "ZImageTransformer2DModel": _block(r"(?:layers|noise_refiner|context_refiner)\.\d+", _ZIMAGE),
}

# Linears whose int4 input nunchaku quantizes unsigned after the GELU shift (act_unsigned).
UNSIGNED_INT4 = {
    "FluxTransformer2DModel": (r".*\.ff\.net\.2", r".*\.ff_context\.net\.2"),
    "QwenImageTransformer2DModel": (r".*\.img_mlp\.net\.2", r".*\.txt_mlp\.net\.2"),
}

NUNCHAKU_CLASSES = {  # safetensors metadata model_class -> diffusers class
    "NunchakuFluxTransformer2dModel": "FluxTransformer2DModel",
    "NunchakuFluxTransformer2DModelV2": "FluxTransformer2DModel",
    "NunchakuQwenImageTransformer2DModel": "QwenImageTransformer2DModel",
    "NunchakuZImageTransformer2DModel": "ZImageTransformer2DModel",
}


def match(model_class: str | None, module: str) -> tuple[Rule, list[str]] | None:
    for rule in RULES.get(model_class or "", ()):
        m = re.fullmatch(rule.pattern, module)
        if m:
            return rule, [m.expand(t) for t in rule.targets]
    return None


def split_name(name: str) -> tuple[str, str]:
    """``a.b.qweight`` -> (``a.b``, ``qweight``), with C++ leaf names translated."""
    module, _, leaf = name.rpartition(".")
    return module, LEAF_ALIASES.get(leaf, leaf)


def proj_out_split(model_config: dict) -> int:
    """Where FLUX single blocks' proj_out input splits: the attention width comes first."""
    return int(model_config["num_attention_heads"]) * int(model_config["attention_head_dim"])


def unsigned_int4(model_class: str, layer: str) -> bool:
    return any(re.fullmatch(p, layer) for p in UNSIGNED_INT4.get(model_class, ()))
