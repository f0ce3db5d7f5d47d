"""A model rewrite (entry point ``wan-fused-qkv`` in group ``diffgen.rewrites``): the projections
of Wan's attentions that read one input, as one layer.

Self-attention's Q, K and V become ``to_qkv``; cross-attention's K and V (both read the text)
become ``to_kv``. That is the layout diffusers' ``WanAttnProcessor`` reads once
``fused_projections`` is set, so the rewrite needs no forward of its own. One GEMM replaces two or
three, and for the W8A8 method one per-token activation quantization replaces two or three, the
cost its README names. ``diffgen.rewrites.fuse_linears`` asks the layers' method to fuse
(``Int8woMethod.fuse``, exact); a method that cannot declines, and the attention stays as built.
"""

from __future__ import annotations

from diffgen.rewrites import BlockRewrite, fuse_linears


class FuseWanProjections(BlockRewrite):
    name = "wan-fused-qkv"
    block_class = "WanAttention"

    def rewrite(self, attn, platform):
        if getattr(attn, "fused_projections", False):
            return "its projections are fused already"
        if type(getattr(attn, "processor", None)).__name__ != "WanAttnProcessor":
            return "a custom attention processor may not read fused projections"
        if getattr(attn, "add_k_proj", None) is not None:
            return "the image branch's add_k_proj is read by the processor even when fused"
        groups = [("to_kv", ("to_k", "to_v"))] if attn.is_cross_attention else [("to_qkv", ("to_q", "to_k", "to_v"))]
        if not fuse_linears(attn, groups):
            return "a projection is 16-bit, or its method cannot fuse it exactly"
        attn.fused_projections = True
        return None


REWRITE = FuseWanProjections()
