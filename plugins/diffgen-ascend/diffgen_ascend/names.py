"""Names: Wan's original module names to diffusers', and msmodelslim's wrapper names to the layer's.

Wan 2.x original -> diffusers ``WanTransformer3DModel`` (the rules SGLang's tools/wan_repack.py
and diffusers' convert_wan_to_diffusers.py apply):
  time_embedding.0/.2 -> condition_embedder.time_embedder.linear_1/_2; time_projection.1 ->
  condition_embedder.time_proj; text_embedding.0/.2 -> condition_embedder.text_embedder.linear_1/_2;
  head.head -> proj_out; head.modulation -> scale_shift_table; blocks.N.modulation ->
  blocks.N.scale_shift_table; self_attn.{q,k,v,o,norm_q,norm_k} -> attn1.{to_q,to_k,to_v,to_out.0,
  norm_q,norm_k}; cross_attn.* -> attn2.* with k_img/v_img/norm_k_img -> add_k_proj/add_v_proj/
  norm_added_k; ffn.0 -> ffn.net.0.proj, ffn.2 -> ffn.net.2; norm3 <-> norm2 (Wan's block order is
  norm1, norm3 (cross-attention, affine), norm2; diffusers' is norm1, norm2 (affine), norm3);
  img_emb.proj.0/.1/.3/.4 -> condition_embedder.image_embedder.norm1/ff.net.0.proj/ff.net.2/norm2,
  img_emb.emb_pos -> condition_embedder.image_embedder.pos_embed.
msmodelslim's non-fusion smoothing wraps a linear: ``<layer>.linear.<param>`` and
``<layer>.div.mul_scale``; the runtime names are ``<layer>.<param>`` and ``<layer>.mul_scale``.
"""

from __future__ import annotations

import re

_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k",
         "k_img": "add_k_proj", "v_img": "add_v_proj", "norm_k_img": "norm_added_k"}
_WAN_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
))
_WAN_ATTN = re.compile(r"^blocks\.(\d+)\.(self_attn|cross_attn)\.(q|k|v|o|norm_q|norm_k|k_img|v_img|norm_k_img)\.")


def wan_original_to_diffusers_name(name: str) -> str:
    """One original Wan tensor (or description) name in diffusers' names; others unchanged."""
    m = _WAN_ATTN.match(name)
    if m:
        attn = "attn1" if m[2] == "self_attn" else "attn2"
        return f"blocks.{m[1]}.{attn}.{_ATTN[m[3]]}.{name[m.end():]}"
    for pattern, replacement in _WAN_RULES:
        renamed, count = pattern.subn(replacement, name, count=1)
        if count:
            return renamed
    return name


def is_wan_original_name(name: str) -> bool:
    """Whether ``name`` is in Wan's original layout (a name diffusers' Wan never has)."""
    return bool(_WAN_ATTN.match(name)) or any(
        p.match(name) for p, _ in _WAN_RULES if "norm2" not in p.pattern)


def strip_wrappers(name: str, is_layer) -> str:
    """``<layer>.linear.<param>`` -> ``<layer>.<param>`` and ``<layer>.div.mul_scale`` ->
    ``<layer>.mul_scale`` when ``is_layer(<layer>)`` says the model has that linear (FLUX's
    ``norm1.linear`` is a real module: its name stays)."""
    if name.endswith(".div.mul_scale"):
        layer = name[: -len(".div.mul_scale")]
        return f"{layer}.mul_scale" if is_layer(layer) else name
    head, sep, param = name.rpartition(".linear.")
    if sep and "." not in param and is_layer(head) and not is_layer(f"{head}.linear"):
        return f"{head}.{param}"
    return name
