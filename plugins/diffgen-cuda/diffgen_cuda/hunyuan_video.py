"""HunyuanVideo rewrites (published in ``diffgen.rewrites``): fused Q/K/V in its attention, its
dual- and single-stream blocks with prepared inputs, and attention on the real text tokens unmasked.

The blocks are FLUX.1's with the sequence the other way round ([video; text]) and RoPE on the
video tokens only. Dual-stream (``HunyuanVideoTransformerBlock``), per stream:

  shift, scale, gate (x2) = AdaLayerNormZero.linear(silu(temb))
  x = x + attn_out * gate_msa,  attention over [video; text] of LayerNorm(x) * (1 + scale) + shift
  x = x + gate_mlp * ff(LayerNorm(x) * (1 + scale_mlp) + shift_mlp),  ff = Linear, GELU (tanh), Linear

Single-stream (``HunyuanVideoSingleTransformerBlock``), on h = [video; text]:
  y = LayerNorm(h) * (1 + scale) + shift;  h = h + gate * proj_out(cat([attention(y), gelu(proj_mlp(y))]))

Q/K/V (and the text stream's add_q/k/v_proj) become one GEMM each where ``LinearMethod.fuse`` does it
exactly; ``FusedHunyuanVideoAttnProcessor`` reads them (diffusers' processor reads separate
projections only), so diffusers' block forwards run on fused attentions too (blocks that keep
diffusers' forward, HunyuanVideo-I2V's token-replace blocks included, are fused all the same).
The rewritten block forwards use FLUX.1's producers (``block_rewrite.norm_modulate_linears``,
``gelu_concat_linear``):

  LayerNorm + modulation -> Q/K/V (fused), added Q/K/V, ff.net.0.proj; single block: Q/K/V and proj_mlp
  GELU                   -> ff.net.2;  cat(attention, GELU) -> single-block proj_out

Everything else is diffusers' own module or function in diffusers' order. The single block's Q/K/V
stay apart from proj_mlp (they live in different modules); one prepared input feeds both. Linears
that take no prepared input (16-bit, other methods) get the 16-bit value, so the blocks are
rewritten in 16-bit models too, for the attention below.

The model always builds a [B, 1, 1, video + text] attention mask from the text mask, and any mask
moves PyTorch's attention off its cuDNN and flash backends. The model rewrite finds, once per
step, how many text tokens are real; where every sample has the same count the blocks attend
without a mask, to the video and real text keys only (the padding is last, and masked keys weigh
nothing, so this is the same attention, on a faster kernel). A processor set after the rewrite
(a custom attention) makes the blocks run diffusers' forward. The token refiner (256 text tokens)
is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffgen.rewrites import BlockRewrite

from .block_rewrite import (QKV_GROUPS, PreparedInputBlockRewrite, ada_norm, feed_forward, fuse_into_processor,
                            gelu_concat_linear, gelu_tanh_ff, modulation, norm_modulate_linears, plain_layer_norm)


def _joint(attn) -> bool:
    return hasattr(attn, "to_added_qkv") or getattr(attn, "add_q_proj", None) is not None


def _projections(attn, text: bool) -> list[nn.Module]:
    """The linears of one stream's Q/K/V: the fused one, or the three."""
    fused, parts = QKV_GROUPS[1 if text else 0]
    return [getattr(attn, fused)] if hasattr(attn, fused) else [getattr(attn, p) for p in parts]


def _qkv(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(outs[0].chunk(3, dim=-1)) if len(outs) == 1 else outs


def _attention(attn, qkv, text_qkv, text: int, mask, image_rotary_emb, text_keys=None) -> torch.Tensor:
    """HunyuanVideoAttnProcessor2_0 from its projections up to the output projections: [B, S, H * D]
    over [video; text]. ``qkv`` projects the video stream (``text_qkv`` the text one) in a dual
    block, all of [video; text] in a single one (``text_qkv`` None; ``text`` 0: no text at all).
    ``text_keys``: attend without ``mask`` to the video and the first ``text_keys`` text keys."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in qkv)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        if text_qkv is None and text:  # the text tokens are the last ``text`` of the sequence: not rotated
            query = torch.cat([apply_rotary_emb(query[:, :-text], image_rotary_emb, sequence_dim=1),
                               query[:, -text:]], dim=1)
            key = torch.cat([apply_rotary_emb(key[:, :-text], image_rotary_emb, sequence_dim=1), key[:, -text:]], dim=1)
        else:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    if text_qkv is not None:
        t_query, t_key, t_value = (t.unflatten(2, (attn.heads, -1)) for t in text_qkv)
        if attn.norm_added_q is not None:
            t_query = attn.norm_added_q(t_query)
        if attn.norm_added_k is not None:
            t_key = attn.norm_added_k(t_key)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((query, t_query), (key, t_key), (value, t_value)))
    if text_keys is not None:
        mask = None
        if text_keys < text:
            keep = key.shape[1] - text + text_keys
            key, value = key[:, :keep], value[:, :keep]
    processor = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                backend=processor._attention_backend, parallel_config=processor._parallel_config)
    return out.flatten(2, 3).to(query.dtype)


def _output_projections(attn, out, text: int):
    """The processor's step 6: (video, text) outputs, each through its output projection if any."""
    video, context = out[:, :-text], out[:, -text:]
    if getattr(attn, "to_out", None) is not None:
        video = attn.to_out[1](attn.to_out[0](video))
    if getattr(attn, "to_add_out", None) is not None:
        context = attn.to_add_out(context)
    return video, context


class FusedHunyuanVideoAttnProcessor:
    """diffusers' HunyuanVideoAttnProcessor2_0 reading fused projections (same arguments)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        joint = _joint(attn)
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if not joint and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        qkv = _qkv([layer(hidden_states) for layer in _projections(attn, False)])
        text_qkv = None
        if joint and encoder_hidden_states is not None:
            text_qkv = _qkv([layer(encoder_hidden_states) for layer in _projections(attn, True)])
        out = _attention(attn, qkv, text_qkv, text, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:  # diffusers projects nothing out then
            return out, None
        return _output_projections(attn, out, text)


_PROCESSORS = ("HunyuanVideoAttnProcessor2_0", "FusedHunyuanVideoAttnProcessor")


# -- the rewritten forwards ------------------------------------------------------------------
class _PreparedInputBlock:
    """What both block mixins share: diffusers' forward unless the attention still runs one of the
    processors this rewrite reads (a processor set later, e.g. for a custom attention, wins)."""

    diffgen_text_keys = None  # set for one model call by HunyuanVideoModelForward

    def _forward(self, args, kwargs, hidden_states, encoder_hidden_states, temb, attention_mask, rotary):
        if type(self.attn.processor).__name__ not in _PROCESSORS:
            return super().forward(hidden_states, encoder_hidden_states, temb, attention_mask, rotary, *args, **kwargs)
        return self._prepared_forward(hidden_states, encoder_hidden_states, temb, attention_mask, rotary)


class DoubleBlockForward(_PreparedInputBlock):
    """Mixed into HunyuanVideoTransformerBlock (dual-stream). diffusers' signature; the extra
    arguments (the model passes the token-replace ones to every block) are ignored, as there."""

    def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None,
                *args, **kwargs):
        return self._forward(args, kwargs, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis)

    def _prepared_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis):
        attn = self.attn
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(self.norm1, temb, 6)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            modulation(self.norm1_context, temb, 6)
        qkv = norm_modulate_linears(_projections(attn, False), hidden_states, shift_msa, scale_msa,
                                     self.norm1.norm.eps)
        text_qkv = norm_modulate_linears(_projections(attn, True), encoder_hidden_states, c_shift_msa, c_scale_msa,
                                          self.norm1_context.norm.eps)
        text = encoder_hidden_states.shape[1]
        out = _attention(attn, _qkv(qkv), _qkv(text_qkv), text, attention_mask, freqs_cis, self.diffgen_text_keys)
        attn_output, context_attn_output = _output_projections(attn, out, text)

        hidden_states = hidden_states + attn_output * gate_msa.unsqueeze(1)
        encoder_hidden_states = encoder_hidden_states + context_attn_output * c_gate_msa.unsqueeze(1)
        ff_output = feed_forward(self.ff, hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
        context_ff_output = feed_forward(self.ff_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                                          self.norm2_context.eps)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        return hidden_states, encoder_hidden_states


class SingleBlockForward(_PreparedInputBlock):
    """Mixed into HunyuanVideoSingleTransformerBlock (diffusers' signature)."""

    def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None,
                *args, **kwargs):
        return self._forward(args, kwargs, hidden_states, encoder_hidden_states, temb, attention_mask,
                             image_rotary_emb)

    def _prepared_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb):
        text = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        residual = hidden_states
        shift_msa, scale_msa, gate = modulation(self.norm, temb, 3)
        *qkv, mlp = norm_modulate_linears(_projections(self.attn, False) + [self.proj_mlp], hidden_states,
                                           shift_msa, scale_msa, self.norm.norm.eps)
        attn_output = _attention(self.attn, _qkv(qkv), None, text, attention_mask, image_rotary_emb,
                                 self.diffgen_text_keys)
        hidden_states = gate.unsqueeze(1) * gelu_concat_linear(self.proj_out, attn_output, mlp)
        hidden_states = hidden_states + residual
        return hidden_states[:, :-text], hidden_states[:, -text:]


class HunyuanVideoModelForward:
    """Mixed into HunyuanVideoTransformer3DModel: tells the rewritten blocks, for this call, how many
    text tokens are real when every sample has the same number (one host sync per step)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, *args, **kwargs):
        blocks = [b for b in [*self.transformer_blocks, *self.single_transformer_blocks]
                  if isinstance(b, _PreparedInputBlock)]
        counts = encoder_attention_mask.sum(dim=1, dtype=torch.int).tolist()  # diffusers' effective lengths
        text_keys = counts[0] if counts and all(c == counts[0] for c in counts) else None
        for block in blocks:
            block.diffgen_text_keys = text_keys
        try:
            return super().forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                   *args, **kwargs)
        finally:
            for block in blocks:
                block.diffgen_text_keys = None


# -- the rewrites ----------------------------------------------------------------------------
def _fuse_attention(attn) -> bool:
    """Q/K/V, and the text stream's, as one GEMM each where the methods fuse them exactly, read by
    ``FusedHunyuanVideoAttnProcessor``; False (nothing changed) where they cannot be."""
    return fuse_into_processor(attn, "HunyuanVideoAttnProcessor2_0", QKV_GROUPS, FusedHunyuanVideoAttnProcessor)


def _attention_as_known(attn, joint: bool) -> bool:
    return (attn is not None and type(getattr(attn, "processor", None)).__name__ in _PROCESSORS
            and _joint(attn) == joint and all(hasattr(attn, n) for n in ("norm_q", "norm_k", "heads")))


class _HunyuanBlockRewrite(PreparedInputBlockRewrite):
    """A HunyuanVideo block: the rewritten forward, and its attention fused (``fuse``; tests turn it
    off to compare the forward bit for bit). Unlike FLUX.1's, it is rewritten even where no linear
    takes a prepared input: the forward is then diffusers' ops, and attention without the text mask
    pays in 16-bit models too. The rewrite is per block, not per attention: diffusers' ``Attention``
    class serves other models too."""

    mismatch = "its parts are not HunyuanVideo's as this rewrite knows them"
    need_prepared_input = False

    def __init__(self, fuse: bool = True):
        self.fuse = fuse

    def attach(self, block, platform):
        if self.fuse:
            _fuse_attention(block.attn)  # the forward reads fused or separate projections alike


class HunyuanVideoDoubleBlock(_HunyuanBlockRewrite):
    name = "hunyuan-video-double-block"
    block_class = "HunyuanVideoTransformerBlock"
    forward_mixin = DoubleBlockForward

    def expected(self, block):
        attn = getattr(block, "attn", None)
        return (ada_norm(block.norm1) and ada_norm(block.norm1_context) and plain_layer_norm(block.norm2)
                and plain_layer_norm(block.norm2_context) and gelu_tanh_ff(block.ff)
                and gelu_tanh_ff(block.ff_context) and _attention_as_known(attn, True)
                and getattr(attn, "to_out", None) is not None and getattr(attn, "to_add_out", None) is not None)

    def producer_groups(self, block):
        attn, ff, ffc = block.attn, block.ff, block.ff_context
        return [_projections(attn, False), _projections(attn, True), [ff.net[0].proj], [ff.net[2]],
                [ffc.net[0].proj], [ffc.net[2]]]


class HunyuanVideoSingleBlock(_HunyuanBlockRewrite):
    name = "hunyuan-video-single-block"
    block_class = "HunyuanVideoSingleTransformerBlock"
    forward_mixin = SingleBlockForward

    def expected(self, block):
        attn = getattr(block, "attn", None)
        return (ada_norm(block.norm) and getattr(block.act_mlp, "approximate", None) == "tanh"
                and _attention_as_known(attn, False) and getattr(attn, "to_out", None) is None)

    def producer_groups(self, block):
        return [_projections(block.attn, False) + [block.proj_mlp], [block.proj_out]]


class FuseHunyuanVideoQKV(BlockRewrite):
    """Where a block keeps diffusers' forward (differently prepared inputs, or a token-replace block
    of HunyuanVideo-I2V), its attention's projections are still fused."""

    name = "hunyuan-video-fused-qkv"

    def __init__(self, block_class: str):
        self.block_class = block_class

    def rewrite(self, block, platform):
        if not _fuse_attention(getattr(block, "attn", None)):
            return "not a HunyuanVideo attention, a projection is 16-bit, or its method cannot fuse it exactly"
        return None


class AttendToRealTextOnly(BlockRewrite):
    name = "hunyuan-video-text-keys"
    block_class = "HunyuanVideoTransformer3DModel"
    forward_mixin = HunyuanVideoModelForward

    def rewrite(self, model, platform):
        blocks = [*getattr(model, "transformer_blocks", ()), *getattr(model, "single_transformer_blocks", ())]
        if not any(isinstance(b, _PreparedInputBlock) for b in blocks):
            return "no block of it is rewritten"
        return None


# One rewrite per module, the first that takes it: the block rewrites before the fusion alone.
REWRITES = [HunyuanVideoDoubleBlock(), HunyuanVideoSingleBlock(),
            *(FuseHunyuanVideoQKV(c) for c in ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
                                                "HunyuanVideoTokenReplaceTransformerBlock",
                                                "HunyuanVideoTokenReplaceSingleTransformerBlock")),
            AttendToRealTextOnly()]
