"""Z-Image rewrites (published in ``diffgen.rewrites``): fused projections in ``ZImageTransformerBlock``.

The block (diffusers' ``transformer_z_image``) is single-stream: text and image tokens in one
sequence, no shift in its modulation, RMSNorm (with weight) around both halves:

  scale_msa, gate_msa, scale_mlp, gate_mlp = adaLN_modulation(adaln_input)    (1 + scale, tanh(gate))
  x = x + gate_msa * attention_norm2(attention(attention_norm1(x) * scale_msa))
  x = x + gate_mlp * ffn_norm2(w2(silu(w1(h)) * w3(h)))    with h = ffn_norm1(x) * scale_mlp

(the context refiner's blocks have no modulation: the same without scales and gates). Two fusions,
each exact by ``LinearMethod.fuse`` (one GEMM computes the same dot products as its parts):

  attention: to_q, to_k, to_v -> to_qkv [3N, K]; ``FusedZImageAttnProcessor`` reads it (or the
             three). After the fused projection, the per-head RMSNorm of q and k and the complex
             RoPE run as FLUX.1's one-pass prologue kernel (``block_rewrite.prologue_kernels``, rounding
             as diffusers' RMSNorm does, the RoPE tables taken from ``freqs_cis``) where Triton
             runs and the tensors are what it computes on; else diffusers' ops. Compiled, those
             ops were a complex multiply Inductor cannot generate (an eager kernel per q and k)
             behind the norms: ~1.6 of 15.9 ms in an H200 step of 10 blocks at 1024x1024
             (benchmarks/family_profile.py, docs/benchmarks/family_profile_z_image_complex_rope_H200.json;
             with the kernel: 15.2 ms, family_profile_z_image_H200.json).
  SwiGLU:    w1, w3 -> w13 [2H, K]; the feed-forward reads silu(first half) * second half, and
             w2 gets that product already quantized where its method takes a prepared input
             (FLUX.2's SwiGLU producer, ``block_rewrite.swiglu_concat_linear``: one pass over the
             [M, 2H] projection instead of the product and then a per-token pass over its
             H = 10240 columns, wider than Inductor fuses well, see ``fused.WIDE_ROW``).

Both are structural (a processor, a feed-forward class that reads ``w13``), so diffusers' block
forward runs on them unchanged and ``undo_rewrites`` keeps them. They are offered per block: the
parts' classes (``Attention``, ``FeedForward``) are names other models use too. No producer serves
RMSNorm * scale (diffgen-cuda's norm producer is LayerNorm + shift/scale), so the block forward
itself stays diffusers'; compiled, Inductor fuses RMSNorm * scale into the FP8 linears' activation
quantization (rows of 3840).
"""

from __future__ import annotations

import functools

import torch

from diffgen.rewrites import BlockRewrite, fuse_linears

from .block_rewrite import fuse_into_processor, prologue_kernels, swiglu_concat_linear, swiglu_kernels

QKV = (("to_qkv", ("to_q", "to_k", "to_v")),)
SWIGLU = (("w13", ("w1", "w3")),)
_Z_IMAGE = "diffusers.models.transformers.transformer_z_image"


def _apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's RoPE: channel pairs as complex numbers times ``freqs_cis`` [B, S, D/2], in fp32."""
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


def _is_diffusers_rms_norm(norm, head_dim: int) -> bool:
    return (type(norm).__name__ == "RMSNorm" and type(norm).__module__ == "diffusers.models.normalization"
            and isinstance(getattr(norm, "weight", None), torch.Tensor) and norm.weight.shape == (head_dim,)
            and norm.weight.dtype == torch.bfloat16 and getattr(norm, "bias", None) is None)


def prologue_args(attn, qkv, freqs_cis):
    """(weights, cos, sin, eps) for the qk_norm_rope kernel, or None unless the tensors are what it
    computes on: ``qkv`` [B, S, 3 * H * D] bf16 on the GPU, diffusers' RMSNorm with bf16 weights
    and one eps on q and k, a power-of-two head size, ``freqs_cis`` complex [1 or B, S, D / 2]."""
    head_dim = qkv.shape[-1] // (3 * attn.heads)
    if not (qkv.is_cuda and qkv.dtype == torch.bfloat16 and qkv.dim() == 3 and qkv.stride(-1) == 1
            and qkv.shape[-1] == 3 * attn.heads * head_dim) or head_dim & (head_dim - 1) or head_dim > 256:
        return None
    norms = (attn.norm_q, attn.norm_k)
    if not all(_is_diffusers_rms_norm(n, head_dim) for n in norms) or norms[0].eps != norms[1].eps:
        return None
    cos = sin = None
    if freqs_cis is not None:
        if not (isinstance(freqs_cis, torch.Tensor) and freqs_cis.dtype == torch.complex64
                and freqs_cis.device == qkv.device and freqs_cis.dim() == 3
                and freqs_cis.shape[1:] == (qkv.shape[1], head_dim // 2) and freqs_cis.shape[0] in (1, qkv.shape[0])):
            return None
        cos, sin = rope_tables(freqs_cis)
    return [n.weight for n in norms], cos, sin, norms[0].eps


def rope_tables(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-Image's complex ``freqs_cis`` [B', S, D / 2] as the kernel's fp32 (cos, sin) tables, each
    angle repeated for its pair of dims (FLUX.1's layout): [S, D] when B' is 1, else [B', S, D]."""
    pairs = torch.view_as_real(freqs_cis).repeat_interleave(2, dim=-2)  # [B', S, D, 2]
    cos, sin = pairs[..., 0].contiguous(), pairs[..., 1].contiguous()
    return (cos[0], sin[0]) if freqs_cis.shape[0] == 1 else (cos, sin)


class FusedZImageAttnProcessor:
    """diffusers' ZSingleStreamAttnProcessor reading fused projections (same arguments)."""

    _attention_backend = None
    _parallel_config = None
    diffgen_qk_norm_rope = None  # (kernel, operator) from block_rewrite.prologue_kernels, set by the rewrite

    def _fused_prologue(self, attn, qkv, freqs_cis):
        """(query, key, value) [B, S, H, D] from the prologue kernel, or None where it does not apply."""
        args = None if self.diffgen_qk_norm_rope is None else prologue_args(attn, qkv, freqs_cis)
        if args is None:
            return None
        kernel = self.diffgen_qk_norm_rope[1 if torch.compiler.is_compiling() else 0]
        out = kernel(qkv, None, *args, False, True)  # no text rows, v not written, diffusers' rounding
        value = qkv.chunk(3, dim=-1)[2].unflatten(-1, (attn.heads, -1))
        return out[0].transpose(1, 2), out[1].transpose(1, 2), value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        fused = None
        if hasattr(attn, "to_qkv"):
            qkv = attn.to_qkv(hidden_states)
            fused = self._fused_prologue(attn, qkv, freqs_cis)
            query, key, value = qkv.chunk(3, dim=-1) if fused is None else fused
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if fused is None:
            query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if freqs_cis is not None:
                query, key = _apply_rotary_emb(query, freqs_cis), _apply_rotary_emb(key, freqs_cis)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = attn.to_out[0](out.flatten(2, 3).to(dtype))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


class FusedSwiGLU:
    """Put in front of Z-Image's FeedForward: reads ``w13`` (w1 and w3 as one GEMM) where it exists,
    and hands w2 its input prepared by FLUX.2's SwiGLU producer where w2's method takes one."""

    diffgen_swiglu = None  # the producer kernels (block_rewrite.swiglu_kernels), set by the rewrite

    def forward(self, x):
        if not hasattr(self, "w13"):
            return self.w2(self._forward_silu_gating(self.w1(x), self.w3(x)))
        # silu(h[..., :H]) * h[..., H:] on h = [w1 x; w3 x] is _forward_silu_gating(w1 x, w3 x)
        return swiglu_concat_linear(self, self.w2, None, self.w13(x))


@functools.cache
def _fused_swiglu_class(cls: type) -> type:
    # No ``_diffgen_original_class``: the class is structural, as the fusion is, and undo keeps it.
    return type(cls.__name__, (FusedSwiGLU, cls), {"__module__": cls.__module__})


def _fuse_attention(attn, platform) -> bool:
    if not fuse_into_processor(attn, "ZSingleStreamAttnProcessor", QKV, FusedZImageAttnProcessor):
        return False
    attn.processor.diffgen_qk_norm_rope = prologue_kernels(platform)
    return True


def _fuse_feed_forward(ff, platform) -> bool:
    cls = type(ff)
    if cls.__module__ != _Z_IMAGE or cls.__name__ != "FeedForward" or isinstance(ff, FusedSwiGLU) \
            or not hasattr(ff, "_forward_silu_gating") or not fuse_linears(ff, SWIGLU):
        return False
    ff.__class__ = _fused_swiglu_class(cls)
    ff.diffgen_swiglu = swiglu_kernels(platform)
    return True


class FuseZImageProjections(BlockRewrite):
    """Q/K/V of the attention and w1/w3 of the feed-forward, each as one GEMM where the methods fuse
    them exactly (either alone when the other cannot be)."""

    name = "z-image-fused-projections"
    block_class = "ZImageTransformerBlock"

    def rewrite(self, block, platform):
        attn, ff = getattr(block, "attention", None), getattr(block, "feed_forward", None)
        if attn is None or ff is None:
            return "its parts are not Z-Image's as this rewrite knows them"
        fused = [_fuse_attention(attn, platform), _fuse_feed_forward(ff, platform)]
        if not any(fused):
            return ("no projections to fuse: a Q/K/V or w1/w3 part is 16-bit, its method cannot fuse it "
                    "exactly, or they are fused already")
        return None


REWRITES = [FuseZImageProjections()]
