"""Fused FP8 linear: one-pass Triton activation quantization feeding torch._scaled_mm.

Serves the builtin ``fp8`` family (HF fp8 checkpoints, ModelOpt FP8, online ``--quantization
fp8``) for per-tensor and per-channel weight scales; the weights, their layout and the GEMM call
are the builtin method's, only the activation quantization differs:
  static:   q = sat(x / input_scale)             (one elementwise pass)
  dynamic:  s = amax(|x_row|) / 448, q = sat(x / s)  (one pass per row, no separate amax pass)
Under torch.compile the PyTorch expressions are used instead, so Inductor can fuse the
quantization into the op that produced x (a norm, a modulation) rather than call an opaque kernel.
"""

from __future__ import annotations

import torch

from diffgen.builtin.fp8 import Fp8ScaledMMMethod, scaled_mm_unavailable_reason
from diffgen.platform import Platform, library
from diffgen.quant import LayerSpec, QuantConfig


def triton_unavailable_reason(platform: Platform) -> str | None:
    if platform.device_kind != "cuda":
        return f"the fused FP8 kernels are written for CUDA GPUs; this device is {platform.device_kind}"
    status = library("triton")
    if not status.available:
        return f"Triton is not importable ({status.reason}); pip install triton"
    return None


class Fp8TritonMethod(Fp8ScaledMMMethod):
    name = "fp8-triton-scaled-mm"
    kind = "native"
    priority = 10  # outranks the builtin method of the same kind: same GEMM, cheaper quantization

    def quantize_static(self, x, scale, dtype):
        if torch.compiler.is_compiling():
            return super().quantize_static(x, scale, dtype)
        from .kernels.fp8_quant import quant_fp8_static

        return quant_fp8_static(x, scale, dtype)

    def quantize_per_token(self, x, dtype):
        if torch.compiler.is_compiling():
            return super().quantize_per_token(x, dtype)
        from .kernels.fp8_quant import quant_fp8_per_token

        return quant_fp8_per_token(x, dtype)


def offer(config: QuantConfig, layer: LayerSpec, platform: Platform) -> Fp8TritonMethod | None:
    """The fused method for one layer of the fp8 family, with the reason when it cannot run."""
    if config.family != "fp8" or config.scheme_for(layer.name) == "block":
        return None
    reason = triton_unavailable_reason(platform) or scaled_mm_unavailable_reason(config, layer, platform)
    if reason is None and layer.in_features > 32768:
        reason = f"the per-token kernel keeps a row in registers; K={layer.in_features} > 32768"
    return Fp8TritonMethod(config, layer, unavailable_reason=reason)
