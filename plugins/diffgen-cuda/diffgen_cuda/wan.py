"""Wan2.1 / Wan2.2 rewrites (published in ``diffgen.rewrites``): fused projections in ``WanAttention``.

diffusers' ``WanAttnProcessor`` reads fused projections when ``fused_projections`` is set: one
[3N, K] ``to_qkv`` in self-attention, one [2N, K] ``to_kv`` (and ``to_added_kv`` for I2V's image
context) in cross-attention. Fusing the quantized linears (``LinearMethod.fuse``, exact) makes one
GEMM and one activation quantization of the 75,600-token video input out of three in every
self-attention. The blocks themselves keep diffusers' forward: Wan's norms and modulation run in
fp32 and attention dominates the step, so prepared inputs are not offered for them yet.
"""

from __future__ import annotations

from diffgen.rewrites import BlockRewrite, fuse_linears

SELF = (("to_qkv", ("to_q", "to_k", "to_v")),)
CROSS = (("to_kv", ("to_k", "to_v")), ("to_added_kv", ("add_k_proj", "add_v_proj")))


class FuseWanAttentionProjections(BlockRewrite):
    name = "wan-fused-projections"
    block_class = "WanAttention"

    def rewrite(self, attn, platform):
        if getattr(attn, "fused_projections", False):
            return "diffusers already fuses this attention's projections"
        if type(getattr(attn, "processor", None)).__name__ != "WanAttnProcessor":
            return "a custom attention processor may not read fused projections"
        if not fuse_linears(attn, CROSS if attn.is_cross_attention else SELF):
            return "a projection is 16-bit, or its method cannot fuse it exactly"
        attn.fused_projections = True
        return None


REWRITES = [FuseWanAttentionProjections()]
