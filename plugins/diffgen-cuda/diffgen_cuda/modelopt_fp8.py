"""ModelOpt FP8 exports whose layers carry extras (``extras.py``): what its diffusers example writes
with ``--format fp8 --quant-algo svdquant``. The declaration says quant_algo FP8, and per layer the
export adds ``pre_quant_scale`` [K] and ``svdquant_lora_a`` [r, K] / ``svdquant_lora_b`` [N, r]
around the FP8 weight, which holds the smoothed weight less the branch:

  y = fp8(xs) @ (weight * weight_scale)^T + b + (xs @ lora_a^T) @ lora_b^T,  xs = x * pre_quant_scale

with fp8() quant_algo FP8's static per-tensor input_scale of the smoothed input. A family of its
own (``modelopt-fp8-extras``): the builtin fp8 methods know nothing of the extras, so they must
never be offered these layers. Each method here is an fp8 method with the extras around its GEMM.

Also ModelOpt's FP8_PB_WO (128x128-block FP8 weights, 16-bit activations), below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.builtin.fp8_methods import Fp8ReferenceMethod
from diffgen.linear import LinearMethod, QuantLinear, check_scales, register_weight
from diffgen.numerics.fp8 import dequantize_fp8_block
from diffgen.quant import LayerSpec, QuantConfig

from .extras import Extras
from .fused import Fp8TritonMethod, fp8_triton_unavailable_reason

FAMILY = "modelopt-fp8-extras"


class _WithExtras(Extras):
    """The extras mixed into an fp8 method: its ``apply`` becomes the ``linear`` they wrap."""

    def __init__(self, config: QuantConfig, layer: LayerSpec, **kwargs):
        super().__init__(config, layer, **kwargs)
        self.init_extras(config, layer.name)

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        super().create_weights(layer, in_features, out_features, dtype)
        self.create_extras(layer, in_features, out_features, dtype)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        self.prepare_extras(layer)

    def fuse(self, layers: list[QuantLinear], name: str) -> QuantLinear | None:
        # the fp8 fusion concatenates weights and scales only: parts with extras keep their own
        if any(layer.method.has_extras for layer in layers):
            return None
        return super().fuse(layers, name)

    def takes_prepared_input(self, layer: QuantLinear, rows: int | None) -> bool:
        # a producer's FP8 would be the unsmoothed input, and the branch needs the 16-bit one
        return not self.has_extras and super().takes_prepared_input(layer, rows)

    def tp_shards(self, style: str, size: int):
        if self.has_extras:
            raise self.split_refusal("FP8")
        return super().tp_shards(style, size)


class Fp8ExtrasReferenceMethod(_WithExtras, Fp8ReferenceMethod):
    name = "modelopt-fp8-extras-reference"

    def linear(self, layer, x, bias):
        return Fp8ReferenceMethod.apply(self, layer, x, bias)


class Fp8ExtrasTritonMethod(_WithExtras, Fp8TritonMethod):
    name = "modelopt-fp8-extras-triton"
    fold_extras = True

    def linear(self, layer, x, bias):
        return Fp8TritonMethod.apply(self, layer, x, bias)


def offer(config: QuantConfig, layer: LayerSpec, platform) -> list[LinearMethod]:
    if config.family != FAMILY:
        return []
    return [Fp8ExtrasReferenceMethod(config, layer),
            Fp8ExtrasTritonMethod(config, layer, unavailable_reason=fp8_triton_unavailable_reason(config, layer, platform))]


# -- FP8_PB_WO ------------------------------------------------------------------------------
# ModelOpt's FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG exports quant_algo FP8_PB_WO: FP8 weights with one
# scale (amax / 448, a multiplier) per 128x128 block, stored [N/128, 1, K/128, 1] (blocks rounded
# up; a scalar when the layer is one block), and no input quantizer: activations stay 16-bit.
#   y = x @ (weight * weight_scale[n // 128, k // 128])^T + b
BLOCK_WO_FAMILY = "modelopt-fp8-pb-wo"
PB = 128


def block_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return -(-out_features // PB), -(-in_features // PB)


class Fp8BlockWeightOnlyReferenceMethod(LinearMethod):
    """The definition: the weight dequantized block by block to the input's dtype, then matmul.
    The only method so far on every device (a 16-bit weight per call: slower than 16-bit)."""

    name = "modelopt-fp8-pb-wo-reference"
    kind = "reference"

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        register_weight(layer, "weight", (out_features, in_features), torch.float8_e4m3fn)
        register_weight(layer, "weight_scale", block_scale_shape(out_features, in_features), torch.float32)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        check_scales(layer, "weight_scale")

    def apply(self, layer, x, bias):
        return F.linear(x, dequantize_fp8_block(layer.weight, layer.weight_scale, (PB, PB)).to(x.dtype), bias)


def block_weight_only_offer(config: QuantConfig, layer: LayerSpec, platform) -> list[LinearMethod]:
    return [Fp8BlockWeightOnlyReferenceMethod(config, layer)] if config.family == BLOCK_WO_FAMILY else []
