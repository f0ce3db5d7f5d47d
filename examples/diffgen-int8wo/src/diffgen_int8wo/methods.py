"""Linear methods for int8wo checkpoints (tensors and math: see ``format.py``).

- ``int8wo-reference`` (reference, any device): dequantize the weight to fp32 and matmul in fp32;
  exactly the format's definition.
- ``int8wo-w8a8-int-mm`` (native, CUDA SM80+): W8A8-dynamic. Activations are quantized per
  token to int8 at run time (x_scale = max_k |x[m, k]| / 127), ``torch._int_mm`` multiplies
  int8 x int8 into int32, and the result is rescaled by x_scale[m] * weight_scale[n]. This is
  NOT weight-only math: activation rounding adds an error of about 0.3% of each row's magnitude.
  ``--quant-backend int8wo-reference`` keeps the format's exact (but slow) math. Measured on an
  H100 at FLUX.1-dev shapes: 0.20-0.30x the speed of bf16, as the activation quantization is
  unfused PyTorch around the GEMM (``benchmarks/int_mm_H100.json``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.linear import LinearMethod, QuantLinear, register_weight
from diffgen.platform import Platform
from diffgen.quant import LayerSpec

from .format import QMAX, dequantize_weight, layer_tensors, quantize_weight

# torch._int_mm on CUDA: M > 16, K and N multiples of 8 (aten/src/ATen/native/cuda/Blas.cpp).
INT_MM_MIN_ROWS = 17
INT_MM_MULTIPLE = 8
_ACT_EPS = 1e-12


class Int8woMethod(LinearMethod):
    """The stored tensors, shared by every int8wo method. Online (``--quantization int8wo``) the
    16-bit weight arrives instead and is quantized once it has."""

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        if self.config.online:
            register_weight(layer, "weight", (out_features, in_features), dtype)
            return
        for name, (shape, tensor_dtype) in layer_tensors(out_features, in_features).items():
            register_weight(layer, name, shape, tensor_dtype)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        if layer.weight.dtype != torch.int8:
            weight, weight_scale = quantize_weight(layer.weight.data)
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
            layer.weight_scale = torch.nn.Parameter(weight_scale, requires_grad=False)
        layer.weight_scale.data = layer.weight_scale.data.float().reshape(-1)

    def fuse(self, layers: list[QuantLinear], name: str) -> QuantLinear | None:
        """Rows concatenated: every output channel keeps its own int8 row and scale, so the fused
        layer computes exactly what the parts did (diffgen.rewrites asks, e.g. rewrites.py)."""
        first = layers[0]
        if (any(type(layer.method) is not type(self) for layer in layers)
                or any(layer.weight.dtype != torch.int8 for layer in layers)
                or len({layer.bias is None for layer in layers}) > 1):
            return None
        spec = LayerSpec(name, first.in_features, sum(layer.out_features for layer in layers),
                         first.bias is not None, first.compute_dtype)
        with torch.device("meta"):
            fused = QuantLinear(spec, type(self)(self.config, spec), dtype=first.compute_dtype)
        for key in ("weight", "weight_scale", "bias"):
            if getattr(first, key) is not None:
                joined = torch.cat([getattr(layer, key).data for layer in layers])
                setattr(fused, key, torch.nn.Parameter(joined, requires_grad=False))
        fused.method.process_weights_after_loading(fused)
        return fused

    def weight_bytes(self, layer: QuantLinear) -> int:
        if layer.weight.dtype != torch.int8:  # planned online, not yet quantized: int8 + fp32 scales
            n, k = layer.weight.shape
            bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
            return n * k + 4 * n + bias
        return super().weight_bytes(layer)


class Int8woReferenceMethod(Int8woMethod):
    name = "int8wo-reference"
    kind = "reference"

    def apply(self, layer, x, bias):
        w = dequantize_weight(layer.weight, layer.weight_scale)
        y = F.linear(x.float(), w, None if bias is None else bias.float())
        return y.to(x.dtype)


def quantize_activations_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M', K], fp32 scale [M', 1]) with M' >= 17 (zero rows pad small batches)."""
    rows = x2d.shape[0]
    if rows < INT_MM_MIN_ROWS:
        x2d = F.pad(x2d, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    scale = x2d.abs().amax(dim=1, keepdim=True).float().clamp_min(_ACT_EPS) / QMAX
    q = torch.round(x2d.float() / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """y = (q(x) * x_scale) @ (weight * weight_scale)^T + bias through torch._int_mm.

    ``weight`` is int8 [N, K] contiguous, so ``weight.t()`` is the column-major [K, N] operand
    cuBLASLt's int8 GEMM wants. int32 accumulation is exact; the rescale is in fp32.
    """
    x2d = x.reshape(-1, x.shape[-1])
    rows = x2d.shape[0]
    q, x_scale = quantize_activations_per_token(x2d)
    acc = torch._int_mm(q, weight.t())[:rows]
    y = acc.float() * x_scale[:rows] * weight_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int8woIntMMMethod(Int8woMethod):
    name = "int8wo-w8a8-int-mm"
    kind = "native"

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        layer.weight.data = layer.weight.data.contiguous()

    def apply(self, layer, x, bias):
        return w8a8_linear(x, layer.weight, layer.weight_scale, bias)


def int_mm_unavailable_reason(layer: LayerSpec, platform: Platform) -> str | None:
    """Why torch._int_mm cannot run ``layer`` here, or None."""
    if platform.device_kind != "cuda" or platform.capability is None:
        return (f"the W8A8 int8 GEMM (torch._int_mm) is used on CUDA GPUs only; this device is "
                f"{platform.device_kind}, where the reference method runs")
    if platform.capability < (8, 0):
        major, minor = platform.capability
        return f"torch._int_mm int8 tensor cores are used on SM80+ here; this GPU is SM{major}{minor}"
    if layer.in_features % INT_MM_MULTIPLE or layer.out_features % INT_MM_MULTIPLE:
        return (f"torch._int_mm needs K and N divisible by {INT_MM_MULTIPLE}; {layer.name} is "
                f"K={layer.in_features}, N={layer.out_features}")
    return None
