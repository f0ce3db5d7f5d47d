"""FLUX.1 blocks whose quantized linears get their input from a fused producer.

In an eager step every op is a kernel launch and a round trip through memory. Before an FP8
linear, diffusers' FLUX.1 blocks compute LayerNorm, the modulation (``* (1 + scale) + shift``),
GELU or a concatenation in bf16, and the linear then reads that bf16 tensor once more to quantize
it. The rewritten blocks ask the linear's method for one pass that does both (``quantize_*`` on
the method; see diffgen.builtin.fp8) and hand the FP8 result straight to its GEMM:

  LayerNorm + modulation -> Q/K/V (fused), ff.net.0.proj, single-block proj_mlp
  GELU                   -> ff.net.2
  cat(attention, GELU)   -> single-block proj_out

Everything else (modulation linears, attention, gating, residuals) is diffusers' own module or
function, called in diffusers' order, but for the attention prologue (RMSNorm of q and k, the
text + image concatenation, RoPE): the to_qkv layer's method may offer it as one pass
(``qk_norm_rope``; diffusers' ops otherwise, ``qk_norm_rope`` below). A linear whose method cannot take a quantized input (a 16-bit
layer kept by an ignore list) gets the bf16 value, from the same pass where possible.

Under torch.compile the rewritten forward is traced as well, and each producer is what the method
gives a compiled graph: PyTorch ops that Inductor fuses, or the method's own operator where that is
faster (diffgen_cuda's GELU + concat). A block is rewritten only if its attention uses FLUX.1's
default processor with fused projections (diffgen.fusion) and some linear in it has a method with
``fuses_producers``; when joint_attention_kwargs are passed (IP-Adapter, attention masks) it falls
back to the original forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import QuantLinear


def norm_modulate(x, shift, scale, eps) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, diffusers' ops (AdaLayerNormZero; FLUX.1's norm2 + scale_mlp)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gelu_concat(a, h) -> torch.Tensor:
    """cat([a, gelu_tanh(h)], -1), or gelu_tanh(h) when ``a`` is None (FLUX.1's feed-forward GELU)."""
    y = F.gelu(h, approximate="tanh")
    return y if a is None else torch.cat([a, y], dim=-1)


def _takes_quantized(layer: nn.Module, rows: int | None = None) -> bool:
    """Whether ``layer`` takes a producer's quantized input (for an input of ``rows`` rows, if
    given: not where its method keeps so few rows in 16 bits)."""
    if not (isinstance(layer, QuantLinear) and layer.method.fuses_producers):
        return False
    return rows is None or not layer.method.weight_only(rows)


def _same_activation_quant(a: QuantLinear, b: QuantLinear) -> bool:
    """Whether one quantized input serves both layers."""
    ma, mb = a.method, b.method
    if type(ma) is not type(mb) or ma.static != mb.static or a.weight.dtype != b.weight.dtype:
        return False
    return not ma.static or torch.equal(a.input_scale, b.input_scale)


def _consistent(layers) -> bool:
    quantized = [layer for layer in layers if _takes_quantized(layer)]
    return all(_same_activation_quant(quantized[0], other) for other in quantized[1:])


def _run(layer, qx, x_shape, dtype) -> torch.Tensor:
    y = layer.method.apply_quantized(layer, *qx, layer.bias, dtype)
    return y.reshape(*x_shape[:-1], -1)


def _norm_modulate_linears(layers, x, shift, scale, eps) -> list[torch.Tensor]:
    """[layer(LayerNorm(x) * (1 + scale) + shift) for layer in layers], quantized in one pass."""
    rows = x.shape[0] * x.shape[1]
    quantized = [_takes_quantized(layer, rows) for layer in layers]
    if not any(quantized):
        y = norm_modulate(x, shift, scale, eps)
        return [layer(y) for layer in layers]
    lead = layers[quantized.index(True)]
    qx, y = lead.method.quantize_norm_modulate(lead, x, shift, scale, eps, not all(quantized))
    return [_run(layer, qx, x.shape, x.dtype) if q else layer(y) for layer, q in zip(layers, quantized)]


def _gelu_concat_linear(layer, a, h) -> torch.Tensor:
    """layer(cat([a, gelu_tanh(h)], -1)); ``a`` may be None."""
    if not _takes_quantized(layer, h.numel() // h.shape[-1]):
        return layer(gelu_concat(a, h))
    return _run(layer, layer.method.quantize_gelu_concat(layer, a, h), h.shape, h.dtype)


def _modulation(norm, temb, chunks):
    return norm.linear(norm.silu(temb)).chunk(chunks, dim=1)


def _feed_forward(ff, x, shift, scale, eps):
    (h,) = _norm_modulate_linears([ff.net[0].proj], x, shift, scale, eps)
    return _gelu_concat_linear(ff.net[2], None, h)


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


def _attention(attn, qkv, context_qkv, image_rotary_emb):
    """The rest of FluxAttnProcessor: its prologue (the to_qkv method's one-pass ``qk_norm_rope``
    where it offers one for these inputs, else diffusers' ops), attention, and the output
    projections when the block has them."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    prologue = getattr(getattr(attn.to_qkv, "method", None), "qk_norm_rope", None)
    qkv_heads = prologue(attn, qkv, context_qkv, image_rotary_emb) if prologue is not None else None
    query, key, value = qkv_heads or qk_norm_rope(attn, qkv, context_qkv, image_rotary_emb)
    out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=attn.processor._attention_backend,
                                parallel_config=attn.processor._parallel_config)
    out = out.flatten(2, 3).to(query.dtype)
    if context_qkv is None:
        return out
    text = context_qkv.shape[1]
    context, image = out.split_with_sizes([text, out.shape[1] - text], dim=1)
    return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(context.contiguous())


class _FusedBlock:
    """The forward both FLUX.1 block mixins share: diffusers' own when joint_attention_kwargs are
    passed, the rewritten ``_fused_forward`` otherwise."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        if joint_attention_kwargs:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   joint_attention_kwargs)
        return self._fused_forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb)


class FusedFluxTransformerBlock(_FusedBlock):
    """Mixed into FluxTransformerBlock (the double-stream block)."""

    def _fused_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        attn = self.attn
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(self.norm1, temb, 6)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            _modulation(self.norm1_context, temb, 6)
        (qkv,) = _norm_modulate_linears([attn.to_qkv], hidden_states, shift_msa, scale_msa, self.norm1.norm.eps)
        (context_qkv,) = _norm_modulate_linears([attn.to_added_qkv], encoder_hidden_states, c_shift_msa,
                                                c_scale_msa, self.norm1_context.norm.eps)
        attn_output, context_attn_output = _attention(attn, qkv, context_qkv, image_rotary_emb)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        ff_output = _feed_forward(self.ff, hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        context_ff_output = _feed_forward(self.ff_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                                          self.norm2_context.eps)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FusedFluxSingleTransformerBlock(_FusedBlock):
    """Mixed into FluxSingleTransformerBlock."""

    def _fused_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        shift_msa, scale_msa, gate = _modulation(self.norm, temb, 3)
        qkv, mlp = _norm_modulate_linears([self.attn.to_qkv, self.proj_mlp], hidden_states, shift_msa,
                                          scale_msa, self.norm.norm.eps)
        attn_output = _attention(self.attn, qkv, None, image_rotary_emb)
        hidden_states = residual + gate.unsqueeze(1) * _gelu_concat_linear(self.proj_out, attn_output, mlp)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _plain_layer_norm(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine


def _ada_norm(norm) -> bool:
    return getattr(norm, "emb", None) is None and _plain_layer_norm(getattr(norm, "norm", None))


def _gelu_tanh_ff(ff) -> bool:
    net = getattr(ff, "net", None)
    return (net is not None and len(net) == 3 and getattr(net[0], "approximate", None) == "tanh"
            and hasattr(net[0], "proj") and isinstance(net[1], nn.Dropout))


def _flux_attention(attn, joint: bool) -> bool:
    return (type(attn.processor).__name__ == "FluxAttnProcessor" and getattr(attn, "fused_projections", False)
            and hasattr(attn, "to_qkv") and hasattr(attn, "to_added_qkv") == joint)


def _producer_groups(block) -> list[list[nn.Module]] | None:
    """The linears each fused producer feeds, or None if the block is not FLUX.1's as expected."""
    name = type(block).__name__
    if name == "FluxTransformerBlock":
        if not (_ada_norm(block.norm1) and _ada_norm(block.norm1_context) and _flux_attention(block.attn, True)
                and _plain_layer_norm(block.norm2) and _plain_layer_norm(block.norm2_context)
                and _gelu_tanh_ff(block.ff) and _gelu_tanh_ff(block.ff_context)):
            return None
        attn = block.attn
        return [[attn.to_qkv], [attn.to_added_qkv], [block.ff.net[0].proj], [block.ff.net[2]],
                [block.ff_context.net[0].proj], [block.ff_context.net[2]]]
    if name == "FluxSingleTransformerBlock":
        if not (_ada_norm(block.norm) and _flux_attention(block.attn, False)
                and getattr(block.act_mlp, "approximate", None) == "tanh"):
            return None
        return [[block.attn.to_qkv, block.proj_mlp], [block.proj_out]]
    return None


_MIXINS = {"FluxTransformerBlock": FusedFluxTransformerBlock,
           "FluxSingleTransformerBlock": FusedFluxSingleTransformerBlock}


@functools.cache
def _fused_class(cls: type) -> type:
    return type(cls.__name__, (_MIXINS[cls.__name__], cls), {"__module__": cls.__module__})


def fuse_blocks(model: nn.Module) -> list[str]:
    """Rewrite every eligible FLUX.1 block of ``model`` in place (its class gains the fused
    forward); returns the rewritten blocks' names."""
    done = []
    for name, block in model.named_modules():
        if isinstance(block, tuple(_MIXINS.values())):
            continue
        groups = _producer_groups(block)
        if groups is None or not any(_takes_quantized(layer) for group in groups for layer in group):
            continue
        if not all(_consistent(group) for group in groups):
            continue  # e.g. two static input scales for one input: each linear quantizes its own
        block.__class__ = _fused_class(type(block))
        done.append(name)
    return done


def unfuse_blocks(model: nn.Module) -> None:
    """Give rewritten blocks their original class back."""
    for block in model.modules():
        if isinstance(block, tuple(_MIXINS.values())):
            block.__class__ = type(block).__bases__[1]  # (mixin, the diffusers class)
