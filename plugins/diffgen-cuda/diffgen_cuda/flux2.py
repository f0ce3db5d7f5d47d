"""FLUX.2 rewrites (published in ``diffgen.rewrites``): fused Q/K/V in the double blocks' attention,
and blocks whose quantized linears get their input prepared in the pass that computes it.

FLUX.2's blocks are FLUX.1's with three differences that matter here: the modulation (shift, scale,
gate) is computed once per step for all blocks (``double_stream_modulation_img/txt``,
``single_stream_modulation``) and handed to each block as [B, 1, 6D] / [B, 1, 3D]; the MLPs are
SwiGLU, ``silu(h[..., :I]) * h[..., I:]`` on a [.., 2I] projection; and the single block's Q/K/V
and MLP input are one linear already (``attn.to_qkv_mlp_proj``, [3D + 2I, D]), its attention and
MLP outputs one ``attn.to_out`` ([D, D + I]). So:

  ``Flux2Attention`` (double blocks): to_q/to_k/to_v, and add_q/k/v_proj, become one GEMM each
  (``fuse_linears``, exact), the layout diffusers' processors read when ``fused_projections`` is set.
  ``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock``: the ops before each linear prepare
  its input in the same pass (``PreparedInputMethod``; diffgen-cuda's Triton producers):
    LayerNorm + modulation -> Q/K/V (fused or not), added Q/K/V, ff(.context).linear_in,
                              single-block to_qkv_mlp_proj
    SwiGLU                 -> ff(.context).linear_out
    cat(attention, SwiGLU) -> single-block attn.to_out
  and the attention prologue (RMSNorm of q and k, text tokens first, RoPE: FLUX.1's convention,
  pairs of adjacent dims) runs as FLUX.1's one-pass kernel (``flux1.fused_qk_norm_rope``) where it
  applies, diffusers' ops elsewhere.

Everything else is diffusers' own module or function, in diffusers' order, so with the reference
producers (PyTorch ops) a rewritten block gives diffusers' numbers bit for bit. diffusers' forward
runs instead with joint_attention_kwargs (the KV cache of FLUX.2 klein, masks) and with per-token
modulation (KV extract mode blends it per token).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffgen.rewrites import BlockRewrite, fuse_linears

from .block_rewrite import (QKV_GROUPS, PreparedInputBlockRewrite, norm_modulate_linears, plain_layer_norm,
                            prologue_kernels, swiglu_concat_linear, swiglu_kernels)
from .flux1 import fused_qk_norm_rope

_DOUBLE_PROCESSORS = ("Flux2AttnProcessor", "Flux2KVAttnProcessor")
_SINGLE_PROCESSORS = ("Flux2ParallelSelfAttnProcessor", "Flux2KVParallelSelfAttnProcessor")


# -- the attention ---------------------------------------------------------------------------
def _heads(attn, parts):
    """A stream's (q, k, v) [B, S, H, D] from its fused projection's output or its three."""
    parts = parts[0].chunk(3, dim=-1) if len(parts) == 1 else parts
    return [p.unflatten(-1, (-1, attn.head_dim)) for p in parts]


def qk_norm_rope(attn, image, text, image_rotary_emb):
    """diffusers' Flux2 processors after the projections, up to attention: (query, key, value)
    [B, S, H, D], per-head RMSNorm on q and k, text tokens first, RoPE. ``image`` and ``text`` are
    the lists of one stream's projection outputs (one fused, or q, k, v); ``text`` None in single
    blocks."""
    from diffusers.models.embeddings import apply_rotary_emb

    query, key, value = _heads(attn, image)
    query, key = attn.norm_q(query), attn.norm_k(key)
    if text is not None:
        t_query, t_key, t_value = _heads(attn, text)
        query = torch.cat([attn.norm_added_q(t_query), query], dim=1)
        key = torch.cat([attn.norm_added_k(t_key), key], dim=1)
        value = torch.cat([t_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def _attention(block, attn, image, text, image_rotary_emb):
    """Prologue (the kernel where the rewrite loaded it and it applies), attention, heads merged."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = None
    kernels = block.diffgen_qk_norm_rope
    if kernels is not None and len(image) == 1 and (text is None or len(text) == 1):
        out = fused_qk_norm_rope(kernels, attn, image[0], None if text is None else text[0], image_rotary_emb)
    query, key, value = qk_norm_rope(attn, image, text, image_rotary_emb) if out is None else out
    processor = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=processor._attention_backend,
                                parallel_config=processor._parallel_config)
    return out.flatten(2, 3).to(query.dtype)


def _projections(attn, joint: bool) -> list[nn.Module]:
    """The linears of one stream's Q/K/V: the fused one, or the three."""
    fused_name, parts = QKV_GROUPS[1 if joint else 0]
    return [getattr(attn, fused_name)] if hasattr(attn, fused_name) else [getattr(attn, p) for p in parts]


def _per_token(*mods) -> bool:
    """Whether a modulation varies along the sequence (KV extract mode), which the producers'
    [B, K] shift and scale cannot express."""
    return any(m.ndim == 3 and m.shape[1] != 1 for m in mods)


def _split(mod: torch.Tensor, sets: int):
    """Flux2Modulation.split: per set (shift, scale, gate), each [B, 1, D]."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    return Flux2Modulation.split(mod, sets)


# -- the rewritten forwards ------------------------------------------------------------------
class DoubleBlockForward:
    """Mixed into Flux2TransformerBlock."""

    def forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                joint_attention_kwargs=None):
        if joint_attention_kwargs or _per_token(temb_mod_img, temb_mod_txt):
            return super().forward(hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                                   image_rotary_emb, joint_attention_kwargs)
        attn = self.attn
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = _split(temb_mod_img, 2)
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = _split(temb_mod_txt, 2)

        image = norm_modulate_linears(_projections(attn, False), hidden_states, shift_msa[:, 0], scale_msa[:, 0],
                                       self.norm1.eps)
        text = norm_modulate_linears(_projections(attn, True), encoder_hidden_states, c_shift_msa[:, 0],
                                      c_scale_msa[:, 0], self.norm1_context.eps)
        out = _attention(self, attn, image, text, image_rotary_emb)
        context, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        attn_output = attn.to_out[1](attn.to_out[0](out.contiguous()))
        context_attn_output = attn.to_add_out(context.contiguous())

        hidden_states = hidden_states + gate_msa * attn_output
        hidden_states = hidden_states + gate_mlp * self._feed_forward(self.ff, hidden_states, shift_mlp, scale_mlp,
                                                                      self.norm2.eps)
        encoder_hidden_states = encoder_hidden_states + c_gate_msa * context_attn_output
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp * self._feed_forward(
            self.ff_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states

    def _feed_forward(self, ff, x, shift, scale, eps):
        (h,) = norm_modulate_linears([ff.linear_in], x, shift[:, 0], scale[:, 0], eps)
        return swiglu_concat_linear(self, ff.linear_out, None, h)


class SingleBlockForward:
    """Mixed into Flux2SingleTransformerBlock."""

    def forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
        if joint_attention_kwargs or _per_token(temb_mod):
            return super().forward(hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb,
                                   joint_attention_kwargs, split_hidden_states, text_seq_len)
        if encoder_hidden_states is not None:
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        attn = self.attn
        ((shift, scale, gate),) = _split(temb_mod, 1)
        (proj,) = norm_modulate_linears([attn.to_qkv_mlp_proj], hidden_states, shift[:, 0], scale[:, 0],
                                         self.norm.eps)
        # diffusers splits by the global Q/K/V : MLP ratio (which also holds for a column shard)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
        attn_output = _attention(self, attn, [qkv], None, image_rotary_emb)
        hidden_states = hidden_states + gate * swiglu_concat_linear(self, attn.to_out, attn_output, mlp)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        if split_hidden_states:
            return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        return hidden_states


# -- eligibility -----------------------------------------------------------------------------
def _swiglu(act) -> bool:
    return type(act).__name__ == "Flux2SwiGLU" and isinstance(getattr(act, "gate_fn", None), nn.SiLU)


def _swiglu_ff(ff) -> bool:
    return (type(ff).__name__ == "Flux2FeedForward" and _swiglu(getattr(ff, "act_fn", None))
            and hasattr(ff, "linear_in") and hasattr(ff, "linear_out"))


def _rms_norms(attn, names) -> bool:
    return all(isinstance(getattr(attn, n, None), nn.Module) for n in names)


class FuseFlux2AttentionQKV(BlockRewrite):
    name = "flux2-fused-qkv"
    block_class = "Flux2Attention"

    def rewrite(self, attn, platform):
        if getattr(attn, "fused_projections", True):
            return "diffusers already fuses or cannot fuse this attention's projections"
        if type(getattr(attn, "processor", None)).__name__ not in _DOUBLE_PROCESSORS:
            return "a custom attention processor may not read fused projections"
        if not fuse_linears(attn, QKV_GROUPS):
            return "a projection is 16-bit, or its method cannot fuse it exactly"
        attn.fused_projections = True
        return None


class _Flux2BlockRewrite(PreparedInputBlockRewrite):
    """A FLUX.2 block: the rewritten forward, with the prologue and SwiGLU kernels where Triton runs."""

    mismatch = "its parts are not FLUX.2's as this rewrite knows them"

    def attach(self, block, platform):
        block.diffgen_qk_norm_rope = prologue_kernels(platform)
        block.diffgen_swiglu = swiglu_kernels(platform)


class Flux2DoubleBlock(_Flux2BlockRewrite):
    name = "flux2-double-block"
    block_class = "Flux2TransformerBlock"
    forward_mixin = DoubleBlockForward

    def expected(self, block):
        attn = getattr(block, "attn", None)
        return (all(plain_layer_norm(getattr(block, n, None)) for n in ("norm1", "norm1_context", "norm2",
                                                                          "norm2_context"))
                and attn is not None and type(getattr(attn, "processor", None)).__name__ in _DOUBLE_PROCESSORS
                and _rms_norms(attn, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
                and _swiglu_ff(getattr(block, "ff", None)) and _swiglu_ff(getattr(block, "ff_context", None)))

    def producer_groups(self, block):
        attn, ff, ffc = block.attn, block.ff, block.ff_context
        return [_projections(attn, False), _projections(attn, True), [ff.linear_in], [ff.linear_out],
                [ffc.linear_in], [ffc.linear_out]]


class Flux2SingleBlock(_Flux2BlockRewrite):
    name = "flux2-single-block"
    block_class = "Flux2SingleTransformerBlock"
    forward_mixin = SingleBlockForward

    def expected(self, block):
        attn = getattr(block, "attn", None)
        return (plain_layer_norm(getattr(block, "norm", None)) and attn is not None
                and type(getattr(attn, "processor", None)).__name__ in _SINGLE_PROCESSORS
                and _rms_norms(attn, ("norm_q", "norm_k")) and _swiglu(getattr(attn, "mlp_act_fn", None))
                and all(hasattr(attn, n) for n in ("to_qkv_mlp_proj", "to_out", "mlp_hidden_dim", "mlp_mult_factor")))

    def producer_groups(self, block):
        return [[block.attn.to_qkv_mlp_proj], [block.attn.to_out]]


REWRITES = [FuseFlux2AttentionQKV(), Flux2DoubleBlock(), Flux2SingleBlock()]
