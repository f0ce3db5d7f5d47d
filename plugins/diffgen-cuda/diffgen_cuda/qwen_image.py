"""Qwen-Image rewrites (published in ``diffgen.rewrites``; Qwen-Image and Qwen-Image-Edit share the
transformer): ``QwenImageTransformerBlock`` runs with its quantized linears fed prepared inputs.

The block is FLUX.1's double block in another arrangement: per stream, LayerNorm (no affine) +
modulation ``x * (1 + scale) + shift`` before Q/K/V and before the MLP, a GELU (tanh) MLP, and one
attention over [text; image] with per-head RMSNorm on q and k and RoPE applied as complex
products. The rewritten forward uses FLUX.1's producers (``block_rewrite.norm_modulate_linears`` and
``gelu_concat_linear``): one pass computes the modulated norm and the FP8 input of the
projections that read it. Q/K/V (and the text stream's) are fused into one GEMM per stream where
``LinearMethod.fuse`` does it exactly (diffusers' Qwen processor cannot read fused projections,
which is why the fusion lives in this block rewrite and not in an attention rewrite of its own).
Per-token modulation (``zero_cond_t`` models pass ``modulate_index``) keeps diffusers' ops: the
modulated norm is then computed in 16 bits and handed to the linears as is; with
joint_attention_kwargs the block runs diffusers' forward. Everything else is diffusers' own module
or function, called in diffusers' order.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffgen.rewrites import BlockRewrite

from .block_rewrite import (QKV_GROUPS, fuse_into_processor, gelu_concat_linear, gelu_tanh_ff, norm_modulate_linears,
                            plain_layer_norm, producer_reason)


def _projections(attn, joint: bool) -> list[nn.Module]:
    """The linears of one stream's Q/K/V: the fused one, or the three."""
    fused, parts = QKV_GROUPS[1 if joint else 0]
    return [getattr(attn, fused)] if hasattr(attn, fused) else [getattr(attn, p) for p in parts]


def _qkv(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(outs[0].chunk(3, dim=-1)) if len(outs) == 1 else outs


def _joint_attention(attn, img_qkv, txt_qkv, mask, image_rotary_emb):
    """QwenDoubleStreamAttnProcessor2_0 from its projections on: (image, text) outputs."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    head_dim = attn.inner_dim // attn.heads
    img_q, img_k, img_v = (t.unflatten(-1, (-1, head_dim)) for t in img_qkv)
    txt_q, txt_k, txt_v = (t.unflatten(-1, (-1, head_dim)) for t in txt_qkv)
    img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
    txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
    if image_rotary_emb is not None:
        img_freqs, txt_freqs = image_rotary_emb
        img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
        img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
        txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
        txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
    query, key = torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1)
    value = torch.cat([txt_v, img_v], dim=1)
    if mask is not None:
        image = torch.ones(mask.shape[0], img_q.shape[1], dtype=torch.bool, device=mask.device)
        mask = torch.cat([mask, image], dim=1)[:, None, None, :]
    processor = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                backend=processor._attention_backend, parallel_config=processor._parallel_config)
    out = out.flatten(2, 3).to(query.dtype)
    text = txt_q.shape[1]
    txt_out, img_out = out[:, :text], out[:, text:]
    img_out = attn.to_out[0](img_out.contiguous())
    if len(attn.to_out) > 1:
        img_out = attn.to_out[1](img_out)
    return img_out, attn.to_add_out(txt_out.contiguous())


class FusedQwenAttnProcessor:
    """diffusers' QwenDoubleStreamAttnProcessor2_0 reading fused projections (same arguments)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                             "Pass encoder_hidden_states_mask to let the processor build the joint mask.")
        img_qkv = _qkv([layer(hidden_states) for layer in _projections(attn, False)])
        txt_qkv = _qkv([layer(encoder_hidden_states) for layer in _projections(attn, True)])
        return _joint_attention(attn, img_qkv, txt_qkv, encoder_hidden_states_mask, image_rotary_emb)


_PROCESSORS = ("QwenDoubleStreamAttnProcessor2_0", "FusedQwenAttnProcessor")


class QwenImageBlockForward:
    """Mixed into QwenImageTransformerBlock."""

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
        if joint_attention_kwargs:
            return super().forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                   image_rotary_emb, joint_attention_kwargs, modulate_index)
        attn = self.attn
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        if self.zero_cond_t:
            temb = torch.chunk(temb, 2, dim=0)[0]
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)

        def image_linears(layers, x, norm, params):
            """(outputs of ``layers`` on the modulated norm of x, gate)."""
            if modulate_index is None:
                shift, scale, gate = params.chunk(3, dim=-1)
                return norm_modulate_linears(layers, x, shift, scale, norm.eps), gate.unsqueeze(1)
            y, gate = self._modulate(norm(x), params, modulate_index)  # per-token: diffusers' ops, 16-bit
            return [layer(y) for layer in layers], gate

        def text_linears(layers, x, norm, params):
            shift, scale, gate = params.chunk(3, dim=-1)
            return norm_modulate_linears(layers, x, shift, scale, norm.eps), gate.unsqueeze(1)

        img_qkv, img_gate = image_linears(_projections(attn, False), hidden_states, self.img_norm1, img_mod1)
        txt_qkv, txt_gate = text_linears(_projections(attn, True), encoder_hidden_states, self.txt_norm1, txt_mod1)
        img_attn, txt_attn = _joint_attention(attn, _qkv(img_qkv), _qkv(txt_qkv), encoder_hidden_states_mask,
                                              image_rotary_emb)
        hidden_states = hidden_states + img_gate * img_attn
        encoder_hidden_states = encoder_hidden_states + txt_gate * txt_attn

        (h,), img_gate = image_linears([self.img_mlp.net[0].proj], hidden_states, self.img_norm2, img_mod2)
        hidden_states = hidden_states + img_gate * gelu_concat_linear(self.img_mlp.net[2], None, h)
        (h,), txt_gate = text_linears([self.txt_mlp.net[0].proj], encoder_hidden_states, self.txt_norm2, txt_mod2)
        encoder_hidden_states = encoder_hidden_states + txt_gate * gelu_concat_linear(self.txt_mlp.net[2], None, h)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FuseQwenAttentionQKV(BlockRewrite):
    """Q/K/V, and the text stream's, as one GEMM each, where the methods fuse them exactly; the
    attention then runs ``FusedQwenAttnProcessor``, so diffusers' block forward works on it too."""

    name = "qwen-image-fused-qkv"
    block_class = "Attention"  # diffusers' generic attention module; the processor says it is Qwen's

    def rewrite(self, attn, platform):
        processor = getattr(attn, "processor", None)
        if type(processor).__name__ != "QwenDoubleStreamAttnProcessor2_0":
            return "not a Qwen-Image attention"
        if not fuse_into_processor(attn, "QwenDoubleStreamAttnProcessor2_0", QKV_GROUPS, FusedQwenAttnProcessor):
            return "a projection is 16-bit, or its method cannot fuse it exactly"
        return None


class QwenImageBlock(BlockRewrite):
    name = "qwen-image-block"
    block_class = "QwenImageTransformerBlock"
    forward_mixin = QwenImageBlockForward

    def rewrite(self, block, platform):
        attn = getattr(block, "attn", None)
        norms = [getattr(block, n, None) for n in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2")]
        if not (all(plain_layer_norm(n) for n in norms) and gelu_tanh_ff(block.img_mlp)
                and gelu_tanh_ff(block.txt_mlp) and attn is not None
                and type(attn.processor).__name__ in _PROCESSORS
                and all(isinstance(getattr(attn, n, None), nn.Module)
                        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))):
            return "its parts are not Qwen-Image's as this rewrite knows them"
        mlps = [[block.img_mlp.net[0].proj], [block.img_mlp.net[2]], [block.txt_mlp.net[0].proj],
                [block.txt_mlp.net[2]]]
        return producer_reason([_projections(attn, False), _projections(attn, True)] + mlps)


class QwenImageModelForward:
    """Mixed into QwenImageTransformer2DModel: a text mask that masks nothing is dropped before
    the blocks see it. diffusers' pipelines always pass the mask, and any mask moves PyTorch's
    attention off the cuDNN and flash backends (which take none) onto a slower one."""

    def forward(self, *args, **kwargs):
        mask = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states_mask")
        if mask is not None and bool(mask.all()):
            if len(args) > 2:
                args = (*args[:2], None, *args[3:])
            else:
                kwargs["encoder_hidden_states_mask"] = None
        return super().forward(*args, **kwargs)


class DropFullTextMask(BlockRewrite):
    name = "qwen-image-full-mask-dropped"
    block_class = "QwenImageTransformer2DModel"
    forward_mixin = QwenImageModelForward


REWRITES = [FuseQwenAttentionQKV(), QwenImageBlock(), DropFullTextMask()]
