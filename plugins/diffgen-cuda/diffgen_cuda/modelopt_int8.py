"""ModelOpt INT8 exports: quant_algo W8A8_SQ_PER_CHANNEL, what the diffusers example writes by
default (``--format int8``, with ``--quant-algo max``, ``smoothquant`` or ``svdquant``), and W8A16
(``INT8_WEIGHT_ONLY_CFG``: no input_scale, 16-bit activations).

Tensors per quantized linear (``export_hf_checkpoint``; scales are dequant multipliers, amax / 127):
  weight           int8 [N, K]   round(W / weight_scale) within [-127, 127]
  weight_scale     fp32 [N]      per output channel
  input_scale      fp32 ()       static, calibrated per tensor
  pre_quant_scale  16-bit [K]    SmoothQuant's or SVDQuant's smoothing, where exported (``extras.py``)
  svdquant_lora_a/b              SVDQuant's low-rank branch, where exported (``extras.py``)
Forward: y = q(xs) @ (weight * weight_scale)^T + b (+ the branch on xs) with xs = x * pre_quant_scale (or x) and q the
int8 grid of the calibrated amax = 127 * input_scale, as ModelOpt's fake quantizer computes it:
s = 127 / amax, q(xs) = clamp(round(xs * s), -128, 127) / s (round half to even; ModelOpt's INT8
configs leave narrow_range off, so an input past the calibrated amax on the negative side keeps
the code -128).

Only the reference method so far, on every device: it writes a 16-bit weight per call, so it is
slower than 16-bit. ``torch._int_mm`` (exact W8A8) is slower than bf16 on Hopper as measured for
msmodelslim's W8A8 (``docs/benchmarks/w8a8_step_H200.json``); a fast path needs another kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.linear import LinearMethod, QuantLinear, check_scales, register_weight
from diffgen.quant import LayerSpec, QuantConfig

from .extras import Extras

FAMILY = "modelopt-int8"
INT8_MAX = 127.0


def int8_layers(source) -> dict[str, str]:
    """Layers the tensors show as ModelOpt INT8 (int8 weight with a per-row fp32 weight_scale):
    name -> "w8a8" (with input_scale) or "w8a16"."""
    tensors, out = source.tensors, {}
    for name, info in tensors.items():
        if not (name.endswith(".weight") and info.dtype == torch.int8 and len(info.shape) == 2):
            continue
        prefix = name[: -len(".weight")]
        scale = tensors.get(f"{prefix}.weight_scale")
        if scale is not None and scale.dtype == torch.float32 and scale.numel == info.shape[0]:
            out[prefix] = "w8a8" if f"{prefix}.input_scale" in tensors else "w8a16"
    return out


def fake_quantize_int8(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x on the per-tensor int8 grid of ``input_scale`` (full range, -128..127), in x's dtype,
    computed as ModelOpt does from the amax (127 * input_scale)."""
    s = INT8_MAX / (input_scale.float() * INT8_MAX)
    return (torch.clamp(torch.round(x.float() * s), -INT8_MAX - 1, INT8_MAX) / s).to(x.dtype)


class Int8Method(Extras, LinearMethod):
    """The stored tensors; each method's GEMM is its ``linear``, the extras go around it."""

    def __init__(self, config: QuantConfig, layer: LayerSpec, **kwargs):
        super().__init__(config, layer, **kwargs)
        self.scheme = config.scheme_for(layer.name) or "w8a8"
        self.init_extras(config, layer.name)

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        register_weight(layer, "weight", (out_features, in_features), torch.int8)
        register_weight(layer, "weight_scale", (out_features,), torch.float32)
        if self.scheme == "w8a8":
            register_weight(layer, "input_scale", (), torch.float32)
        self.create_extras(layer, in_features, out_features, dtype)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        check_scales(layer, "input_scale")
        check_scales(layer, "weight_scale", zero_ok=True)


class Int8ReferenceMethod(Int8Method):
    """Dequantize the weight, put the activations on their int8 grid, matmul: the definition."""

    name = "modelopt-int8-reference"
    kind = "reference"

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = (layer.weight.float() * layer.weight_scale.float()[:, None]).to(x.dtype)
        if self.scheme == "w8a8":
            x = fake_quantize_int8(x, layer.input_scale)
        return F.linear(x, w, bias)


def offer(config: QuantConfig, layer: LayerSpec, platform) -> list[LinearMethod]:
    return [Int8ReferenceMethod(config, layer)] if config.family == FAMILY else []
