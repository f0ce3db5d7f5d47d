"""NVFP4 linears: ModelOpt's NVFP4 (W4A4) and W4A16_NVFP4 exports, and their reference method.

Tensors per quantized linear (``export_hf_checkpoint``; K padded up to Kp, a multiple of 16):
  weight          uint8 [N, Kp/2]           E2M1 codes, element 2i in the low nibble
  weight_scale    float8_e4m3fn [N, Kp/16]  one per 16-element block, row-major
  weight_scale_2  fp32 ()                   global dequant multiplier, w_amax / (6 * 448)
  input_scale     fp32 ()                   W4A4 only: calibrated activation amax / (6 * 448)
Forward (``diffgen.numerics.nvfp4``): y = q(x) @ W^T + b with W = e2m1 * weight_scale *
weight_scale_2; q rounds the activations to NVFP4 block by block with input_scale as their global
scale (W4A4; ``w4a4-dynamic``, for layers exported without an input_scale, takes the global scale
from each input's amax), and leaves them 16-bit for W4A16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.linear import LinearMethod, QuantLinear, register_weight
from diffgen.numerics.e2m1 import E2M1_MAX
from diffgen.numerics.fp8 import FP8_E4M3_MAX
from diffgen.numerics.nvfp4 import BLOCK, dequantize_nvfp4, fake_quantize_nvfp4
from diffgen.quant import LayerSpec, QuantConfig

FAMILY = "nvfp4"
SCHEMES = ("w4a4", "w4a16", "w4a4-dynamic")
E4M3 = torch.float8_e4m3fn


def padded_k(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def nvfp4_layers(source) -> dict[str, str]:
    """Layers the tensors show as NVFP4: name -> "w4a4" (with input_scale) or "w4a4-dynamic", or
    "group G" when the block scales do not cover 16 elements each."""
    tensors = source.tensors
    out = {}
    for name, info in tensors.items():
        if not (name.endswith(".weight") and info.dtype == torch.uint8 and len(info.shape) == 2):
            continue
        prefix = name[: -len(".weight")]
        scale, scale_2 = tensors.get(f"{prefix}.weight_scale"), tensors.get(f"{prefix}.weight_scale_2")
        if scale is None or scale_2 is None or scale.dtype != E4M3 or len(scale.shape) != 2:
            continue
        group = 2 * info.shape[1] // scale.shape[1] if scale.shape[1] else 0
        if group != BLOCK and scale.shape[0] == info.shape[0]:
            out[prefix] = f"group {group}"
        else:
            out[prefix] = "w4a4" if f"{prefix}.input_scale" in tensors else "w4a4-dynamic"
    return out


class Nvfp4Method(LinearMethod):
    """The stored tensors, shared by every NVFP4 method."""

    @property
    def scheme(self) -> str:
        return self.config.scheme_for(self.layer.name) or "w4a4"

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        kp = padded_k(in_features)
        register_weight(layer, "weight", (out_features, kp // 2), torch.uint8)
        register_weight(layer, "weight_scale", (out_features, kp // BLOCK), E4M3)
        register_weight(layer, "weight_scale_2", (), torch.float32)
        if self.scheme == "w4a4":
            register_weight(layer, "input_scale", (), torch.float32)

    def input_global_scale(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
        """The activations' global scale, or None when they stay 16-bit."""
        if self.scheme == "w4a16":
            return None
        if self.scheme == "w4a4":
            return layer.input_scale
        return x.abs().amax().float() / (E2M1_MAX * FP8_E4M3_MAX)


class Nvfp4ReferenceMethod(Nvfp4Method):
    """Dequantize the whole weight, fake-quantize the activations, matmul: the definition, on any
    device, slowly (a 16-bit copy of the weight per call)."""

    name = "nvfp4-reference"
    kind = "reference"

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize_nvfp4(layer.weight, layer.weight_scale, layer.weight_scale_2, k=layer.in_features,
                             dtype=x.dtype)
        global_scale = self.input_global_scale(layer, x)
        if global_scale is not None:
            x = fake_quantize_nvfp4(x, global_scale)
        return F.linear(x, w, bias)


def offer(config: QuantConfig, layer: LayerSpec, platform) -> list[LinearMethod] | None:
    if config.family != FAMILY:
        return None
    return [Nvfp4ReferenceMethod(config, layer)]
