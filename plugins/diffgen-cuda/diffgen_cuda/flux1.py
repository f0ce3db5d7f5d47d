"""FLUX.1 rewrites (published in ``diffgen.rewrites``): fused Q/K/V, and blocks whose quantized
linears get their input prepared in the pass that computes it.

``FluxAttention`` (innermost, so first): its three projections, and the three added (text) ones,
become one GEMM each (``diffgen.rewrites.fuse_linears``, exact by ``LinearMethod.fuse``), the
layout diffusers' ``FluxAttnProcessor`` reads when ``fused_projections`` is set. One [3N, K] GEMM
replaces three [N, K] ones: fewer launches, one activation quantization, a wider GEMM at 512 text
tokens.

``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``: before a linear, diffusers' blocks
compute LayerNorm + modulation, GELU or a concatenation in 16 bits, and the linear then reads that
tensor again to quantize it. The rewritten forward asks each linear's method for one pass that
does both (``PreparedInputMethod``; diffgen-cuda's Triton producers) and hands the result straight
to its GEMM:

  LayerNorm + modulation -> Q/K/V (fused), ff.net.0.proj, single-block proj_mlp
  GELU                   -> ff.net.2
  cat(attention, GELU)   -> single-block proj_out

Everything else (modulation linears, attention, gating, residuals) is diffusers' own module or
function, called in diffusers' order, but for the attention prologue (RMSNorm of q and k, text
tokens first, RoPE), which runs as one kernel (``kernels/qk_norm_rope.py``) where it applies to
the tensors and diffusers' ops (``qk_norm_rope`` below) elsewhere. A linear that does not take a
prepared input (kept 16-bit, or few rows) gets the 16-bit value, from the same pass where possible.
Under torch.compile the rewritten forward is traced as well. A block is rewritten only if its
parts are FLUX.1's as expected, its attention is fused, and some linear takes prepared inputs;
with joint_attention_kwargs (IP-Adapter, attention masks) it runs diffusers' forward.
"""

from __future__ import annotations

import torch

from diffgen.rewrites import BlockRewrite, fuse_linears

from .block_rewrite import (QKV_GROUPS, PreparedInputBlockRewrite, ada_norm, feed_forward, gelu_concat_linear,
                            gelu_tanh_ff, modulation, norm_modulate_linears, plain_layer_norm, prologue_kernels)

# -- the attention ---------------------------------------------------------------------------
def qk_norm_rope(attn, qkv, context_qkv, image_rotary_emb):
    """FluxAttnProcessor after its fused projections (diffusers 0.3x-0.4x), up to attention:
    (query, key, value) [B, S, H, D] with per-head RMSNorm on q and k, text tokens first, RoPE."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(t):
        return [p.unflatten(-1, (-1, attn.head_dim)) for p in t.chunk(3, dim=-1)]

    query, key, value = heads(qkv)
    query, key = attn.norm_q(query), attn.norm_k(key)
    if context_qkv is not None:
        c_query, c_key, c_value = heads(context_qkv)
        query = torch.cat([attn.norm_added_q(c_query), query], dim=1)
        key = torch.cat([attn.norm_added_k(c_key), key], dim=1)
        value = torch.cat([c_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def prologue_args(attn, qkv, context_qkv, image_rotary_emb):
    """(weights, cos, sin, eps) for the qk_norm_rope kernel, or None unless the block's tensors are
    what it computes on: bf16 on the GPU, torch.nn.RMSNorm with bf16 weights and one eps, a
    power-of-two head size, RoPE as (cos, sin) [S, D] tables."""
    joint = context_qkv is not None
    norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if joint else [])
    tensors = [qkv] + ([context_qkv] if joint else [])
    head_dim = attn.head_dim
    if not all(t.is_cuda and t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.dim() == 3
               and t.shape[::2] == qkv.shape[::2] for t in tensors):  # [B, S, 3 * H * D], one B and width
        return None
    if head_dim & (head_dim - 1) or head_dim > 256 or qkv.shape[-1] % (3 * head_dim):
        return None
    if not all(type(n) is torch.nn.RMSNorm and n.weight is not None and n.weight.shape == (head_dim,)
               and n.weight.dtype == torch.bfloat16 for n in norms):
        return None
    eps = [torch.finfo(qkv.dtype).eps if n.eps is None else n.eps for n in norms]
    if any(e != eps[0] for e in eps):
        return None
    cos = sin = None
    if image_rotary_emb is not None:
        if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
            return None
        cos, sin = image_rotary_emb
        seq = qkv.shape[1] + (context_qkv.shape[1] if joint else 0)
        if not all(isinstance(t, torch.Tensor) and t.shape == (seq, head_dim) and t.device == qkv.device
                   and t.is_floating_point() for t in (cos, sin)) or cos.stride(-1) != 1 or sin.stride() != cos.stride():
            return None
    return [n.weight for n in norms], cos, sin, eps[0]


def fused_qk_norm_rope(kernels, attn, qkv, context_qkv, image_rotary_emb):
    """``qk_norm_rope`` in one kernel (eager, or its operator in a compiled graph; ``kernels`` from
    ``prologue_kernels``), or None where the kernel does not apply to these tensors."""
    args = prologue_args(attn, qkv, context_qkv, image_rotary_emb)
    if args is None:
        return None
    kernel = kernels[1] if torch.compiler.is_compiling() else kernels[0]
    joint = context_qkv is not None
    out = kernel(qkv, context_qkv, *args, write_v=joint)
    query, key = out[0].transpose(1, 2), out[1].transpose(1, 2)
    # Single blocks: v needs no concatenation, and attention reads it in place.
    value = out[2].transpose(1, 2) if joint else qkv.chunk(3, dim=-1)[2].unflatten(-1, (-1, attn.head_dim))
    return query, key, value


def _prologue(block, attn, qkv, context_qkv, image_rotary_emb):
    """The block's prologue kernel where the rewrite loaded it and it applies, else diffusers' ops."""
    kernels = block.diffgen_qk_norm_rope  # (kernel, operator) or None
    out = fused_qk_norm_rope(kernels, attn, qkv, context_qkv, image_rotary_emb) if kernels is not None else None
    return qk_norm_rope(attn, qkv, context_qkv, image_rotary_emb) if out is None else out


def _attention(block, qkv, context_qkv, image_rotary_emb):
    """The rest of FluxAttnProcessor: its prologue, attention, and the output projections when
    the block has them."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    attn = block.attn
    query, key, value = _prologue(block, attn, qkv, context_qkv, image_rotary_emb)
    out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=attn.processor._attention_backend,
                                parallel_config=attn.processor._parallel_config)
    out = out.flatten(2, 3).to(query.dtype)
    if context_qkv is None:
        return out
    text = context_qkv.shape[1]
    context, image = out.split_with_sizes([text, out.shape[1] - text], dim=1)
    return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(context.contiguous())


# -- the rewritten forwards ------------------------------------------------------------------
class _PreparedInputBlock:
    """The forward both FLUX.1 block mixins share: diffusers' own when joint_attention_kwargs are
    passed, the rewritten ``_prepared_forward`` otherwise."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        if joint_attention_kwargs:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   joint_attention_kwargs)
        return self._prepared_forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb)


class DoubleBlockForward(_PreparedInputBlock):
    """Mixed into FluxTransformerBlock (the double-stream block)."""

    def _prepared_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        attn = self.attn
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(self.norm1, temb, 6)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            modulation(self.norm1_context, temb, 6)
        (qkv,) = norm_modulate_linears([attn.to_qkv], hidden_states, shift_msa, scale_msa, self.norm1.norm.eps)
        (context_qkv,) = norm_modulate_linears([attn.to_added_qkv], encoder_hidden_states, c_shift_msa,
                                                c_scale_msa, self.norm1_context.norm.eps)
        attn_output, context_attn_output = _attention(self, qkv, context_qkv, image_rotary_emb)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        ff_output = feed_forward(self.ff, hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        context_ff_output = feed_forward(self.ff_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                                          self.norm2_context.eps)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class SingleBlockForward(_PreparedInputBlock):
    """Mixed into FluxSingleTransformerBlock."""

    def _prepared_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        shift_msa, scale_msa, gate = modulation(self.norm, temb, 3)
        qkv, mlp = norm_modulate_linears([self.attn.to_qkv, self.proj_mlp], hidden_states, shift_msa,
                                          scale_msa, self.norm.norm.eps)
        attn_output = _attention(self, qkv, None, image_rotary_emb)
        hidden_states = residual + gate.unsqueeze(1) * gelu_concat_linear(self.proj_out, attn_output, mlp)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _fused_flux_attention(attn, joint: bool) -> bool:
    return (type(attn.processor).__name__ == "FluxAttnProcessor" and getattr(attn, "fused_projections", False)
            and hasattr(attn, "to_qkv") and hasattr(attn, "to_added_qkv") == joint)


class FuseFluxAttentionQKV(BlockRewrite):
    name = "flux1-fused-qkv"
    block_class = "FluxAttention"

    def rewrite(self, attn, platform):
        if getattr(attn, "fused_projections", True):
            return "diffusers already fuses or cannot fuse this attention's projections"
        if type(getattr(attn, "processor", None)).__name__ != "FluxAttnProcessor":
            return "a custom attention processor may not read fused projections"
        if not fuse_linears(attn, QKV_GROUPS):
            return "a projection is 16-bit, or its method cannot fuse it exactly"
        attn.fused_projections = True
        return None


class _FluxBlockRewrite(PreparedInputBlockRewrite):
    """A FLUX.1 block: the rewritten forward, with the prologue kernel where Triton runs."""

    mismatch = "its parts are not FLUX.1's as this rewrite knows them (or its attention is not fused)"

    def needs_prepared_input(self, block, platform):
        # Where the prologue kernel runs, a block of weight-only methods gains from it alone (one
        # pass against Inductor's fusion of diffusers' ops, or ~35 launches eager). Its attention
        # is fused (``expected``), so its Q/K/V are quantized: 16-bit blocks stay diffusers', whose
        # numbers the kernel does not repeat to the bit.
        return prologue_kernels(platform) is None

    def attach(self, block, platform):
        block.diffgen_qk_norm_rope = prologue_kernels(platform)


class FluxDoubleBlock(_FluxBlockRewrite):
    name = "flux1-double-block"
    block_class = "FluxTransformerBlock"
    forward_mixin = DoubleBlockForward

    def expected(self, block):
        return (ada_norm(block.norm1) and ada_norm(block.norm1_context) and _fused_flux_attention(block.attn, True)
                and plain_layer_norm(block.norm2) and plain_layer_norm(block.norm2_context)
                and gelu_tanh_ff(block.ff) and gelu_tanh_ff(block.ff_context))

    def producer_groups(self, block):
        attn, ff, ffc = block.attn, block.ff, block.ff_context
        return [[attn.to_qkv], [attn.to_added_qkv], [ff.net[0].proj], [ff.net[2]], [ffc.net[0].proj], [ffc.net[2]]]


class FluxSingleBlock(_FluxBlockRewrite):
    name = "flux1-single-block"
    block_class = "FluxSingleTransformerBlock"
    forward_mixin = SingleBlockForward

    def expected(self, block):
        return (ada_norm(block.norm) and _fused_flux_attention(block.attn, False)
                and getattr(block.act_mlp, "approximate", None) == "tanh")

    def producer_groups(self, block):
        return [[block.attn.to_qkv, block.proj_mlp], [block.proj_out]]


REWRITES = [FuseFluxAttentionQKV(), FluxDoubleBlock(), FluxSingleBlock()]
