"""What the families' rewritten blocks share (``flux1``, ``flux2``, ``qwen_image``, ``hunyuan_video``,
``z_image``): the ops that run a linear on a prepared input (LayerNorm + modulation, GELU and SwiGLU
producers), the loaders of the Triton kernels a rewrite attaches (the attention prologue, the SwiGLU
producer), the recognisers of diffusers' parts, and the rule for when a family's rewritten forward
takes over a block.

A block is rewritten when its parts are what the family's forward expects, and the linears that read
one input can share one prepared input (``LinearMethod.shares_prepared_input``: e.g. the same static
scale). Most families also ask that some linear take a prepared input at all: in 16-bit or on the
reference method their forward would gain nothing over diffusers'.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.linear import gelu_concat, norm_modulate, prepared_input_method
from diffgen.rewrites import BlockRewrite, fuse_linears

from . import fused

QKV_GROUPS = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))


# -- the ops before each linear --------------------------------------------------------------
def run_prepared(layer, prepared, x_shape, dtype) -> torch.Tensor:
    return layer.method.apply_prepared(layer, prepared, layer.bias, dtype).reshape(*x_shape[:-1], -1)


def norm_modulate_linears(layers, x, shift, scale, eps) -> list[torch.Tensor]:
    """[layer(norm_modulate(x, shift, scale, eps)) for layer in layers], prepared in one pass."""
    rows = x.shape[0] * x.shape[1]
    prepared = [prepared_input_method(layer, rows) is not None for layer in layers]
    if not any(prepared):
        y = norm_modulate(x, shift, scale, eps)
        return [layer(y) for layer in layers]
    lead = layers[prepared.index(True)]
    px, y = lead.method.prepare_norm_modulate(lead, x, shift, scale, eps, not all(prepared))
    return [run_prepared(layer, px, x.shape, x.dtype) if p else layer(y) for layer, p in zip(layers, prepared)]


def gelu_concat_linear(layer, a, h) -> torch.Tensor:
    """layer(gelu_concat(a, h)); ``a`` may be None."""
    method = prepared_input_method(layer, h.numel() // h.shape[-1])
    if method is None:
        return layer(gelu_concat(a, h))
    return run_prepared(layer, method.prepare_gelu_concat(layer, a, h), h.shape, h.dtype)


def swiglu_concat(a: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """``cat([a, silu(h[..., :I]) * h[..., I:]], -1)`` (``a`` may be None): diffusers' Flux2SwiGLU,
    and the single block's concatenation of attention and MLP before its one output projection."""
    half = h.shape[-1] // 2
    y = F.silu(h[..., :half]) * h[..., half:]
    return y if a is None else torch.cat([a, y], dim=-1)


def swiglu_kernels(platform):
    """The SwiGLU producer and its operator, imported now (never inside a compiled region), where
    Triton runs here; None elsewhere."""
    if fused.triton_unavailable_reason(platform) is not None:
        return None
    from .kernels import swiglu_quant

    return swiglu_quant.swiglu_concat_quant, swiglu_quant.swiglu_concat_quant_op


def prepare_swiglu_concat(kernels, method, layer, a, h):
    """``swiglu_concat(a, h)`` prepared for ``layer``: a method's own ``prepare_swiglu_concat`` if it
    has one; for the fp8 family's methods ``(q, scale_a)``, from the Triton producer (kernels from
    ``swiglu_kernels``) when it runs here, else the PyTorch ops then the method's quantization.
    None for other methods (the layer then takes the 16-bit value)."""
    own = getattr(method, "prepare_swiglu_concat", None)
    if own is not None:
        return own(layer, a, h)
    if not hasattr(method, "quantize_input"):
        return None
    if isinstance(method, fused.Fp8TritonMethod) and method.unavailable_reason is None and kernels is not None:
        kernel = kernels[1] if torch.compiler.is_compiling() else kernels[0]
        if kernel is not None:
            static_scale = layer.input_scale if method.static else None
            q, s = kernel(a, h, static_scale, layer.weight.dtype)
            return q, static_scale if method.static else s
    y = swiglu_concat(a, h)
    return method.quantize_input(layer, y.reshape(-1, y.shape[-1]))


def swiglu_concat_linear(block, layer, a, h) -> torch.Tensor:
    """layer(swiglu_concat(a, h)), prepared in one pass where the layer's method takes it."""
    method = prepared_input_method(layer, h.numel() // h.shape[-1])
    prepared = None if method is None else prepare_swiglu_concat(block.diffgen_swiglu, method, layer, a, h)
    if prepared is None:
        return layer(swiglu_concat(a, h))
    return run_prepared(layer, prepared, h.shape, h.dtype)


# -- the kernels a rewrite loads (imported now, never inside a compiled region) ----------------
def prologue_kernels(platform):
    """The qk_norm_rope kernel and its operator, imported now (never inside a compiled region),
    where Triton runs here; None elsewhere."""
    if fused.triton_unavailable_reason(platform) is not None:
        return None
    prologue = fused.kernels().prologue
    return prologue.qk_norm_rope, prologue.qk_norm_rope_op


def modulation(norm, temb, chunks):
    return norm.linear(norm.silu(temb)).chunk(chunks, dim=1)


def feed_forward(ff, x, shift, scale, eps):
    (h,) = norm_modulate_linears([ff.net[0].proj], x, shift, scale, eps)
    return gelu_concat_linear(ff.net[2], None, h)


# -- what the rewrites recognise -----------------------------------------------------------------------------
def plain_layer_norm(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine


def ada_norm(norm) -> bool:
    return getattr(norm, "emb", None) is None and plain_layer_norm(getattr(norm, "norm", None))


def gelu_tanh_ff(ff) -> bool:
    net = getattr(ff, "net", None)
    return (net is not None and len(net) == 3 and getattr(net[0], "approximate", None) == "tanh"
            and hasattr(net[0], "proj") and isinstance(net[1], nn.Dropout))


def shares(layers) -> bool:
    """Whether one prepared input serves every layer of the group that takes one."""
    taking = [layer for layer in layers if prepared_input_method(layer) is not None]
    return all(taking[0].method.shares_prepared_input(taking[0], other) for other in taking[1:])


def producer_reason(groups, *, need_prepared_input: bool = True) -> str | None:
    """Why a block whose linears read their inputs in ``groups`` is left alone, or None."""
    if need_prepared_input and not any(prepared_input_method(layer) is not None for group in groups for layer in group):
        return "no linear of it takes a prepared input (16-bit, or methods without fused producers)"
    if not all(shares(group) for group in groups):
        return "two linears reading one input need differently prepared inputs (e.g. two static scales)"
    return None


class PreparedInputBlockRewrite(BlockRewrite):
    """A block whose parts are as ``expected`` gets the family's forward (``forward_mixin``) unless
    ``producer_reason`` says otherwise for its ``producer_groups`` (the linears each prepared input
    feeds); ``attach`` then gives the block what its forward uses (kernels) or fuses its parts."""

    mismatch: ClassVar[str] = "its parts are not what this rewrite knows"  # the reason when not ``expected``
    need_prepared_input: ClassVar[bool] = True

    def expected(self, block) -> bool:
        raise NotImplementedError

    def producer_groups(self, block) -> list[list[nn.Module]]:
        raise NotImplementedError

    def attach(self, block, platform) -> None:
        """Prepare an accepted block (nothing by default)."""

    def needs_prepared_input(self, block, platform) -> bool:
        """Whether the block gains from the rewrite only where some linear takes a prepared input."""
        return self.need_prepared_input

    def rewrite(self, block, platform):
        if not self.expected(block):
            return self.mismatch
        reason = producer_reason(self.producer_groups(block),
                                 need_prepared_input=self.needs_prepared_input(block, platform))
        if reason is None:
            self.attach(block, platform)
        return reason


def fuse_into_processor(attn, processor_name: str, groups, fused_processor: type) -> bool:
    """Fuse ``attn``'s projections (``fuse_linears`` over ``groups``) and give it a
    ``fused_processor()`` that reads the fused layout, keeping the attention backend and parallel
    config diffusers set on the processor it replaces. False, with nothing changed, when the
    processor is not ``processor_name`` or a method cannot fuse its part exactly."""
    processor = getattr(attn, "processor", None)
    if type(processor).__name__ != processor_name or not fuse_linears(attn, groups):
        return False
    fused = fused_processor()
    fused._attention_backend, fused._parallel_config = processor._attention_backend, processor._parallel_config
    attn.processor = fused
    return True
