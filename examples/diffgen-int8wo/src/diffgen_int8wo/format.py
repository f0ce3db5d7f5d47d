"""The int8wo format: int8 weights, one fp32 scale per output channel, 16-bit activations.

Tensors per quantized linear (N = out_features, K = in_features):
  weight        int8     [N, K]   q = clamp(round(W / weight_scale[:, None]), -127, 127)
  weight_scale  float32  [N]      max_k |W[n, k]| / 127, a multiplier: W ~= weight * weight_scale[:, None]
  bias          16-bit   [N]      unchanged, when the layer has one
Layers kept in 16-bit store a floating ``weight`` and no ``weight_scale``.
config.json: ``"quantization_config": {"quant_method": "int8wo", "weight_bits": 8,
"granularity": "per-channel", "symmetric": true, "ignored_layers": [...]}``.
Forward: y = x @ (weight * weight_scale[:, None])^T + bias. Rounding moves each weight by at
most weight_scale / 2.
"""

from __future__ import annotations

import torch

QUANT_METHOD = "int8wo"
SCHEMES = ("per-channel",)
QMAX = 127  # symmetric: -128 is never used, so negating a row never overflows
_SCALE_EPS = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero


def layer_tensors(out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors (suffix -> shape, dtype) of one quantized linear, as stored."""
    return {"weight": ((out_features, in_features), torch.int8), "weight_scale": ((out_features,), torch.float32)}


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16-bit weight [N, K] -> (weight int8 [N, K], weight_scale fp32 [N])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(_SCALE_EPS) / QMAX
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight int8 [N, K] and weight_scale [N] (or [N, 1]) -> W [N, K] in ``dtype``."""
    return (weight.float() * weight_scale.float().reshape(-1, 1)).to(dtype)


def quantization_config(ignored_layers: list[str]) -> dict:
    """The ``quantization_config`` entry of config.json."""
    return {"quant_method": QUANT_METHOD, "weight_bits": 8, "granularity": "per-channel",
            "symmetric": True, "ignored_layers": list(ignored_layers)}
