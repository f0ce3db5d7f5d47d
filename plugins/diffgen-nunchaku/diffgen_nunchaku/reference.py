"""SVDQuant W4A4 and AWQ W4A16 linears in plain PyTorch: the format's definition, on any device.

SVDQ W4A4 tensors per linear (plain layouts, ``layout.py``): qweight uint8 [N, K/2] (int4
two's-complement or E2M1 codes, low nibble first), wscales [N, K/G] (16-bit for int4, G = 64;
float8_e4m3fn for nvfp4, G = 16), smooth_factor [K], proj_down [r, K] (already divided by the
smoothing), proj_up [N, r], bias [N]; nvfp4 adds wcscales [P, N] and wtscale [P] per input part.
Forward, per input part p (one, or FLUX single blocks' attention | MLP halves of proj_out):
    x_p' = x_p + 0.171875 if the part is unsigned (int4 only: the GELU output of an MLP's fc2)
    a_p  = Q(x_p' / smooth_p)   per token, per group: int4 scale absmax/7 (absmax/15 unsigned,
                                codes 0..15), nvfp4 E2M1 with E4M3 scale min(absmax/6, 448)
    y   += a_p @ R_p^T (* wcscales_p * wtscale_p),  R = codes * wscales
    y   += (x @ proj_down^T) @ proj_up^T + bias     (the low-rank branch sees the unshifted x)
The stored bias already subtracts 0.171875 * sum_k R/smooth for unsigned parts.
AWQ W4A16: qweight uint8 [N, K/2] unsigned codes, wscales and wzeros [N, K/64]:
    y = x @ (codes * wscales + wzeros)^T + bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.linear import LinearMethod, QuantLinear, ShardError, register_weight
from diffgen.numerics.e2m1 import e2m1_to_float, float_to_e2m1
from diffgen.numerics.fp8 import FP8_E4M3_MAX

from .detect import GROUP, LayerFormat, layer_format
from .names import SHIFT
from .packing import plain_to_nibbles

E4M3 = torch.float8_e4m3fn


def svdq_weights(method: LinearMethod, layer: QuantLinear, k: int, n: int, dtype: torch.dtype) -> None:
    """Register an SVDQ linear's tensors (the same for every SVDQ method)."""
    fmt, precision = method.format, method.precision
    group = GROUP[precision]
    register_weight(layer, "qweight", (n, k // 2), torch.uint8)
    register_weight(layer, "wscales", (n, k // group), E4M3 if precision == "nvfp4" else dtype)
    register_weight(layer, "smooth_factor", (k,), dtype)
    register_weight(layer, "proj_down", (fmt.rank, k), dtype)
    register_weight(layer, "proj_up", (n, fmt.rank), dtype)
    if precision == "nvfp4":
        register_weight(layer, "wcscales", (len(fmt.parts), n), dtype)
        register_weight(layer, "wtscale", (len(fmt.parts),), torch.float32)


def awq_weights(layer: QuantLinear, k: int, n: int, dtype: torch.dtype) -> None:
    register_weight(layer, "qweight", (n, k // 2), torch.uint8)
    register_weight(layer, "wscales", (n, k // 64), dtype)
    register_weight(layer, "wzeros", (n, k // 64), dtype)


def residual(layer: QuantLinear, precision: str, lo: int, hi: int, part: int) -> torch.Tensor:
    """R for inputs lo:hi in fp32, the per-channel and per-tensor nvfp4 factors included."""
    codes = plain_to_nibbles(layer.qweight)[:, lo:hi]
    group = GROUP[precision]
    scales = layer.wscales[:, lo // group: hi // group].float().repeat_interleave(group, dim=1)
    if precision == "int4":
        return (codes - 16 * (codes >= 8)).float() * scales
    r = e2m1_to_float(codes.to(torch.uint8)) * scales
    return r * layer.wcscales[part].float()[:, None] * layer.wtscale[part].float()


def quantize_activation(x: torch.Tensor, precision: str, unsigned: bool) -> torch.Tensor:
    """x [M, K] fp32 -> its 4-bit value per token and group, as nunchaku's quantize kernel rounds it."""
    group = GROUP[precision]
    blocks = x.reshape(x.shape[0], -1, group)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if precision == "nvfp4":
        scale = (amax / 6).clamp(max=FP8_E4M3_MAX).to(E4M3).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = e2m1_to_float(float_to_e2m1(blocks / safe)) * scale
    else:
        levels, lo, hi = (15, 0, 15) if unsigned else (7, -8, 7)
        scale = amax / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe).clamp(lo, hi) * scale
    return q.reshape(x.shape)


class SvdqReferenceMethod(LinearMethod):
    name = "svdq-w4a4-reference"
    kind = "reference"

    def __init__(self, config, layer, **kw):
        super().__init__(config, layer, **kw)
        self.format: LayerFormat = layer_format(config, layer.name)
        self.precision = config.param("precision", "int4")

    def create_weights(self, layer, in_features, out_features, dtype):
        svdq_weights(self, layer, in_features, out_features, dtype)

    def tp_shards(self, style, size):
        """Not split yet. By linearity the low-rank branch would (column-parallel: proj_up's rows;
        row-parallel: proj_down's columns, the rank's partial x @ down^T @ up^T summed by the
        all-reduce), but the residual's per-part scales (wcscales, wtscale) and the input parts of
        FLUX.1's single-block proj_out are not mapped onto rank slices."""
        raise ShardError(f"{self.name} ({self.layer.name}): diffgen does not split SVDQuant layers for tensor "
                         "parallelism yet (the 4-bit residual's per-part scales and smoothing with the low-rank "
                         "branch); run it with --ulysses-degree, --ring-degree or --cfg-parallel-size")

    def apply(self, layer, x, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        y = (x2 @ layer.proj_down.float().t()) @ layer.proj_up.float().t()
        lo = 0
        for p, part in enumerate(self.format.parts):
            hi = lo + part.k
            xp = x2[:, lo:hi] + SHIFT if part.unsigned else x2[:, lo:hi]
            a = quantize_activation(xp / layer.smooth_factor[lo:hi].float(), self.precision, part.unsigned)
            y = y + a @ residual(layer, self.precision, lo, hi, p).t()
            lo = hi
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], -1)


def awq_weight(layer: QuantLinear) -> torch.Tensor:
    codes = plain_to_nibbles(layer.qweight).float()
    scales = layer.wscales.float().repeat_interleave(64, dim=1)
    zeros = layer.wzeros.float().repeat_interleave(64, dim=1)
    return codes * scales + zeros


class AwqReferenceMethod(LinearMethod):
    name = "awq-w4a16-reference"
    kind = "reference"

    def create_weights(self, layer, in_features, out_features, dtype):
        awq_weights(layer, in_features, out_features, dtype)

    def apply(self, layer, x, bias):
        return F.linear(x, awq_weight(layer).to(x.dtype), bias)
