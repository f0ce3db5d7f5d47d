"""Single quantized layers for tests and benchmarks, built from a 16-bit weight."""

from __future__ import annotations

import torch

from ..builtin.fp8_methods import quantize_weight
from ..linear import QuantLinear
from ..quant import LayerSpec, QuantConfig


def fp8_linear(method_cls, weight: torch.Tensor, *, scheme: str = "per-channel", activation: str = "dynamic",
               bias: torch.Tensor | None = None, input_scale: float | torch.Tensor | None = None,
               dtype: torch.dtype = torch.bfloat16, name: str = "layer") -> QuantLinear:
    """A ready-to-run layer of the builtin fp8 family on ``weight``'s device: ``weight`` [N, K]
    quantized with ``scheme``, run by ``method_cls`` (any fp8 LinearMethod, a plugin's too)."""
    params = {"activation_scheme": activation, **({"block": (128, 128)} if scheme == "block" else {})}
    config = QuantConfig.make("fp8", scheme=scheme, params=params)
    n, k = weight.shape
    spec = LayerSpec(name, k, n, bias is not None, dtype)
    with torch.device(weight.device):
        layer = QuantLinear(spec, method_cls(config, spec), dtype=dtype)
    for key, t in quantize_weight(weight, scheme).items():
        getattr(layer, key).data = t.reshape(getattr(layer, key).shape)
    if bias is not None:
        layer.bias.data = bias.to(device=weight.device, dtype=dtype)
    if activation == "static":
        layer.input_scale.data = torch.as_tensor(input_scale, dtype=torch.float32, device=weight.device).reshape(())
    layer.method.process_weights_after_loading(layer)
    return layer
