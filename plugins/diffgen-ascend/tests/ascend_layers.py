"""Small shared pieces of the plugin's tests: building one quantized layer, running a model."""

from __future__ import annotations

import torch

from diffgen.linear import QuantLinear
from diffgen.quant import LayerSpec, QuantConfig
from msmodelslim_writer import quantize_layer


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return (out[0] if isinstance(out, list) else out).float()


def layer_from(scheme: str, tensors: dict, method_cls, *, smooth=False, dtype=torch.float32) -> QuantLinear:
    n = tensors["weight"].shape[0]
    k = tensors["mul_scale"].shape[0] if smooth else (tensors["weight"].shape[1] * (2 if tensors["weight"].dtype == torch.uint8 else 1))
    spec = LayerSpec("blocks.0.proj", k, n, "bias" in tensors, dtype)
    config = QuantConfig.make("msmodelslim", scheme=scheme, params={"smooth_layers": ("blocks.0.proj",) if smooth else ()},
                              layer_schemes={"blocks.0.proj": scheme})
    layer = QuantLinear(spec, method_cls(config, spec), dtype=dtype)
    for key, value in tensors.items():
        setattr(layer, key, torch.nn.Parameter(value.clone(), requires_grad=False))
    layer.method.process_weights_after_loading(layer)
    return layer


def random_layer(scheme: str, n=48, k=64, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.05, 2, n)[:, None]
    bias = torch.randn(n, generator=g)
    t = quantize_layer(scheme, w, bias, 4.0)
    t["bias"] = bias
    return t
