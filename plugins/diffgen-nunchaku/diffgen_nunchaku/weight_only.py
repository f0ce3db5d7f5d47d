"""SVDQuant on GPUs nunchaku has no kernels for (Hopper): 4-bit weights, 16-bit activations.

Uses diffgen-cuda's ``packed4`` kernel (one Triton pass writes W in 16-bit, cuBLAS multiplies).
The plain layouts are already ``packed4``'s: int4 codes with a bf16/fp16 scale per 64 inputs, or
E2M1 codes with an E4M3 scale per 16 and the per-tensor ``wtscale`` as global scale (``wcscales``
multiplies the output channels). Per input part p, with s the smoothing:
    y = sum_p packed4(x_p / s_p, R_p) [* wcscales_p] + (x @ proj_down^T) @ proj_up^T + bias'
Activations are not quantized, so an unsigned part's shift cancels exactly: bias' adds back the
0.171875 * sum_k R/s that nunchaku's exporter took out of the stored bias.
AWQ W4A16 rows: codes q in 0..15 become q - 8 (two's complement), so W = (q - 8) s + (wzeros + 8 s)
and the zero term is a [K/64]-wide product: y = packed4(x, q - 8, s) + groupsum(x) @ zeros'^T + b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffgen.numerics.int4 import pack_int4

from .names import SHIFT
from .packing import plain_to_nibbles
from .reference import GROUP, AwqReferenceMethod, SvdqReferenceMethod, residual

NEEDS_CUDA = "needs diffgen-cuda: pip install diffgen[cuda]"


def packed4_reason(layer, platform, *, fp4: bool, fp8: bool = False) -> str | None:
    """Why diffgen-cuda's packed4 kernels (with ``fp8``: its W4A8 path) cannot run here, or None."""
    try:
        from diffgen_cuda import packed4
    except ImportError:
        return NEEDS_CUDA
    reason = packed4.fp8_unavailable_reason if fp8 else packed4.unavailable_reason
    return reason(layer, platform, scales=packed4.E4M3 if fp4 else packed4.FLOAT)


@dataclass
class PartArgs:
    """One ``packed4.linear`` call: inputs lo:hi, its weight, scales, global and channel scales."""

    lo: int
    hi: int
    weight: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    channel_scale: torch.Tensor | None


def prepare_svdq(layer, fmt, precision: str) -> tuple[list[PartArgs], torch.Tensor, torch.Tensor]:
    """The packed4 arguments of every part, 1 / smooth_factor, and the bias with the shifts folded in."""
    parts, lo = [], 0
    group = GROUP[precision]
    bias = layer.bias.float() if layer.bias is not None else torch.zeros(layer.out_features, device=layer.qweight.device)
    smooth = layer.smooth_factor.float()
    for p, part in enumerate(fmt.parts):
        hi = lo + part.k
        if part.unsigned:
            bias = bias + SHIFT * (residual(layer, precision, lo, hi, p) / smooth[lo:hi]).sum(dim=1)
        fp4 = precision == "nvfp4"
        parts.append(PartArgs(
            lo, hi, layer.qweight[:, lo // 2: hi // 2].contiguous(), layer.wscales[:, lo // group: hi // group].contiguous(),
            layer.wtscale[p].float().reshape(()) if fp4 else torch.ones((), device=layer.qweight.device),
            layer.wcscales[p].contiguous() if fp4 else None))
        lo = hi
    return parts, (1 / smooth).to(layer.compute_dtype), bias.to(layer.compute_dtype)


class SvdqPacked4Method(SvdqReferenceMethod):
    name = "svdq-packed4"
    kind = "weight-only"

    def process_weights_after_loading(self, layer):
        parts, inv_smooth, bias = prepare_svdq(layer, self.format, self.precision)
        # buffers, so that .to() and offload move them with the layer
        layer.register_buffer("inv_smooth", inv_smooth, persistent=False)
        layer.register_buffer("bias_folded", bias, persistent=False)
        self.ranges = [(p.lo, p.hi) for p in parts]
        for i, p in enumerate(parts):
            layer.register_buffer(f"part{i}_weight", p.weight, persistent=False)
            layer.register_buffer(f"part{i}_scale", p.scale, persistent=False)
            layer.register_buffer(f"part{i}_global", p.global_scale, persistent=False)
            layer.register_buffer(f"part{i}_channel", p.channel_scale, persistent=False)
        if len(parts) > 1:  # the parts hold the codes and scales now
            del layer.qweight, layer.wscales

    def apply(self, layer, x, bias):
        from diffgen_cuda import packed4

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = (x2 @ layer.proj_down.t()) @ layer.proj_up.t() + layer.bias_folded
        codes, scales = (packed4.E2M1, packed4.E4M3) if self.precision == "nvfp4" else (packed4.INT4, packed4.FLOAT)
        for i, (lo, hi) in enumerate(self.ranges):
            xs = x2[:, lo:hi] * layer.inv_smooth[lo:hi]
            out = packed4.linear(xs, getattr(layer, f"part{i}_weight"), getattr(layer, f"part{i}_scale"),
                                 getattr(layer, f"part{i}_global"), None, hi - lo,
                                 codes=codes, scales=scales, group=GROUP[self.precision])
            channel = getattr(layer, f"part{i}_channel")
            y = y + (out * channel if channel is not None else out)
        return y.reshape(*shape[:-1], -1)

    def weight_bytes(self, layer):
        """Parameters and buffers; a one-part layer's buffers are views of its parameters."""
        seen, total = set(), 0
        for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if (t.data_ptr(), t.numel()) not in seen:
                seen.add((t.data_ptr(), t.numel()))
                total += t.numel() * t.element_size()
        return total


class SvdqPacked4W4A8Method(SvdqPacked4Method):
    """``svdq-packed4`` on FP8 tensor cores (Ada, Hopper): each part's 4-bit weight is written on a
    per-row FP8 grid and x / smooth is quantized per token (diffgen-cuda's ``packed4.linear_fp8``);
    the low-rank branch stays 16-bit. Inputs of at most four rows (modulation) take the 16-bit path.
    Activations are 8-bit, not the format's 4: more exact than W4A4, as the weight-only path is; the
    weight rounds once more (a 4-bit code times its 16-bit scale has more than E4M3's 4 significant
    bits). nunchaku's own kernels, where they run, outrank it (priority)."""

    name = "svdq-packed4-w4a8"
    kind = "native"
    priority = -1

    def process_weights_after_loading(self, layer):
        from diffgen_cuda import packed4

        super().process_weights_after_loading(layer)
        codes, scales = self._kinds(packed4)
        for i in range(len(self.ranges)):
            rows = packed4.row_scales(getattr(layer, f"part{i}_scale"), getattr(layer, f"part{i}_global"),
                                      codes=codes, scales=scales, channel_scale=getattr(layer, f"part{i}_channel"))
            for key, t in zip(("scale_b", "factor", "one"), rows):
                layer.register_buffer(f"part{i}_{key}", t, persistent=False)

    def _kinds(self, packed4):
        return (packed4.E2M1, packed4.E4M3) if self.precision == "nvfp4" else (packed4.INT4, packed4.FLOAT)

    def apply(self, layer, x, bias):
        from diffgen_cuda import packed4

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] <= 4:
            return super().apply(layer, x, bias)
        codes, scales = self._kinds(packed4)
        y = (x2 @ layer.proj_down.t()) @ layer.proj_up.t() + layer.bias_folded
        for i, (lo, hi) in enumerate(self.ranges):
            xs = x2[:, lo:hi] * layer.inv_smooth[lo:hi]
            rows = tuple(getattr(layer, f"part{i}_{key}") for key in ("scale_b", "factor", "one"))
            y = y + packed4.linear_fp8(xs, getattr(layer, f"part{i}_weight"), getattr(layer, f"part{i}_scale"),
                                       rows, None, hi - lo, codes=codes, scales=scales, group=GROUP[self.precision])
        return y.reshape(*shape[:-1], -1)


def prepare_awq(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed codes q - 8 (packed), the scales, and the zeros with 8 * scale folded in."""
    codes = plain_to_nibbles(layer.qweight) - 8
    return pack_int4(codes.to(torch.int8)), layer.wscales, (layer.wzeros.float() + 8 * layer.wscales.float()).to(layer.wscales.dtype)


class AwqPacked4Method(AwqReferenceMethod):
    name = "awq-packed4"
    kind = "weight-only"

    def process_weights_after_loading(self, layer):
        weight, scale, zeros = prepare_awq(layer)
        layer.qweight = torch.nn.Parameter(weight, requires_grad=False)
        layer.register_buffer("zeros_folded", zeros, persistent=False)
        del layer.wzeros

    def apply(self, layer, x, bias):
        from diffgen_cuda import packed4

        ones = torch.ones((), device=x.device)
        y = packed4.linear(x, layer.qweight, layer.wscales, ones, bias, layer.in_features,
                           codes=packed4.INT4, scales=packed4.FLOAT, group=64)
        groups = x.reshape(*x.shape[:-1], -1, 64).sum(-1)
        return y + groups @ layer.zeros_folded.to(x.dtype).t()
