"""FP8 on MI300 (gfx942): the builtin ``fp8`` family (HF fp8 and ModelOpt FP8 checkpoints, online
``--quantization fp8``) with e4m3fnuz weights, through ``torch._scaled_mm`` (hipBLASLt).

MI300's FP8 is e4m3fnuz (exponent bias 8, no infinity, one NaN at 0x80), not the OCP e4m3fn the
checkpoints hold. Every fn bit pattern means twice its fnuz value, so the weight is reinterpreted
byte for byte (0x80, fn's -0, becomes 0) and its scales doubled
(``diffgen.numerics.fp8.fp8_e4m3fn_to_e4m3fnuz``): the dequantized weight is unchanged. A static
``input_scale`` doubles too, so that the calibrated activation range (amax = 448 * input_scale)
lands on fnuz's 224, inside its 240, instead of saturating at half the range. Dynamic
activations are quantized per token straight to fnuz (amax / 240). Tensors and forward are the
builtin ones (``diffgen.builtin.fp8_methods``); this method only prepares the arguments.
"""

from __future__ import annotations

import torch

from diffgen.builtin.fp8_methods import Fp8Method, Fp8ScaledMMMethod
from diffgen.linear import QuantLinear
from diffgen.numerics.fp8 import fp8_e4m3fn_to_e4m3fnuz
from diffgen.quant import LayerSpec, QuantConfig

FNUZ = torch.float8_e4m3fnuz
MI300_ARCHS = ("gfx940", "gfx941", "gfx942")


def fnuz_platform_reason(platform) -> str | None:
    if platform.device_kind != "rocm":
        return f"e4m3fnuz FP8 is MI300's (ROCm gfx942); this device is {platform.device_kind}"
    if platform.gfx_arch not in MI300_ARCHS:
        return (f"e4m3fnuz FP8 is MI300's (gfx940-gfx942); this GPU is {platform.gfx_arch or 'unknown'}, which the "
                "builtin fp8-scaled-mm serves")
    return None


def fnuz_unavailable_reason(config: QuantConfig, layer: LayerSpec, platform) -> str | None:
    reason = fnuz_platform_reason(platform)
    if reason is None and config.scheme_for(layer.name) == "block":
        reason = "128x128 block scales are not prepared for hipBLASLt by diffgen-rocm; per-tensor and per-channel are"
    if reason is None and (layer.in_features % 16 or layer.out_features % 16):
        reason = (f"torch._scaled_mm needs K and N divisible by 16; {layer.name} is "
                  f"K={layer.in_features}, N={layer.out_features}")
    if reason is None and layer.dtype not in (torch.bfloat16, torch.float16):
        reason = f"FP8 GEMMs output bf16/fp16; the compute dtype is {layer.dtype}"
    return reason


class Fp8FnuzMethod(Fp8ScaledMMMethod):
    """``fp8-scaled-mm`` with its arguments prepared for MI300: e4m3fnuz weight, doubled scales.
    Adapter, not run: the preparation is tested on the CPU; the GEMM is the builtin's."""

    name = "rocm-fp8-fnuz"
    kind = "native"
    priority = 10  # outranks the builtin fp8-scaled-mm, which would quantize activations with e4m3fn's range

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        Fp8Method.process_weights_after_loading(self, layer)  # online quantization, scale checks
        if layer.weight.dtype == torch.float8_e4m3fn:
            q, s = fp8_e4m3fn_to_e4m3fnuz(layer.weight.data, layer.weight_scale.data)
            layer.weight.data, layer.weight_scale.data = q, s.to(layer.weight_scale.device)
            if self.static:
                layer.input_scale.data = layer.input_scale.data * 2.0
        s = layer.weight_scale.data.float().reshape(1, -1)
        layer.register_buffer("_scale_b", s.expand(1, layer.out_features).contiguous(), persistent=False)
