"""Wan2.1 / Wan2.2 rewrites (published in ``diffgen.rewrites``): fused projections in ``WanAttention``,
and the feed-forward's GELU written straight into its down projection's prepared input.

diffusers' ``WanAttnProcessor`` reads fused projections when ``fused_projections`` is set: one
[3N, K] ``to_qkv`` in self-attention, one [2N, K] ``to_kv`` (and ``to_added_kv`` for I2V's image
context) in cross-attention. Fusing the quantized linears (``LinearMethod.fuse``, exact) makes one
GEMM and one activation quantization of the 75,600-token video input out of three in every
self-attention.

In ``WanTransformerBlock`` the feed-forward (a tanh GELU between two linears) runs its first
projection, then hands the GELU of its output to the down projection as a prepared input
(``gelu_concat_linear``: on CUDA diffgen-cuda's GELU -> FP8 Triton producer, eager and compiled);
the rest of the block is diffusers' forward, op for op (bit-identical, tested).
Diffusers' forward writes the 16-bit GELU of a [75,600, 13,824] tensor and the quantization reads
it back: on an H100 that was 4.2 ms of GELU plus 2.1 ms of quantization per two blocks of a
compiled Wan2.2 720p step (docs/benchmarks/family_profile_wan_fp8_fa3_H100.json). Wan's norms
and modulation stay in fp32 as diffusers runs them; compiled, Inductor already fuses them with the
quantization. The rewrite is per block, not per ``FeedForward``: rewrites apply by class to every
model, and the other families' rewritten blocks call their feed-forwards themselves.
"""

from __future__ import annotations

from diffgen.rewrites import BlockRewrite, fuse_linears

from .block_rewrite import PreparedInputBlockRewrite, gelu_concat_linear, gelu_tanh_ff

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


class WanBlockForward:
    """``WanTransformerBlock.forward`` (diffusers 0.42) with the feed-forward's GELU written into
    its down projection's prepared input; diffusers' feed-forward when training (its dropout)."""

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        table = self.scale_shift_table.unsqueeze(0) if temb.ndim == 4 else self.scale_shift_table
        # [B, 6, C] (one modulation per sample), or TI2V's [B, L, 6, C] (one per token)
        chunks = (table + temb.float()).chunk(6, dim=2 if temb.ndim == 4 else 1)
        shift, scale, gate, c_shift, c_scale, c_gate = (c.squeeze(2) for c in chunks) if temb.ndim == 4 else chunks
        x = hidden_states
        normed = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(normed, None, None, rotary_emb) * gate).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), encoder_hidden_states, None, None)
        normed = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        ff = self.ffn
        out = ff(normed) if ff.training else gelu_concat_linear(ff.net[2], None, ff.net[0].proj(normed))
        return (x.float() + out.float() * c_gate).type_as(x)


class WanGeluProducer(PreparedInputBlockRewrite):
    name = "wan-gelu-producer"
    block_class = "WanTransformerBlock"
    forward_mixin = WanBlockForward
    mismatch = "its feed-forward is not a tanh-GELU feed-forward"

    def expected(self, block) -> bool:
        return gelu_tanh_ff(getattr(block, "ffn", None)) and hasattr(block, "scale_shift_table")

    def producer_groups(self, block):
        return [[block.ffn.net[2]]]


REWRITES = [FuseWanAttentionProjections(), WanGeluProducer()]
