"""Fuse an attention's quantized Q/K/V projections into one GEMM after loading.

The three projections read the same input, so one [3N, K] GEMM replaces three [N, K] ones: fewer
launches (the host cost of a quantized linear is several times that of nn.Linear), one activation
quantization instead of three, and a wider GEMM that uses the GPU better at 512 text tokens.

Only where diffusers' own fused path is known to exist: the attention class and its default
processor read ``to_qkv`` / ``to_added_qkv`` when ``fused_projections`` is set (the layout that
``AttentionModuleMixin.fuse_projections`` builds for 16-bit weights). A module is fused whole or
not at all, and only when every projection's method can fuse with the others without changing the
numbers (``LinearMethod.fuse`` decides, and says no otherwise).
"""

from __future__ import annotations

import torch.nn as nn

from .linear import QuantLinear

# attention class -> (its default processor class, [(fused name, the projections it replaces)])
FUSABLE: dict[str, tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
    "FluxAttention": ("FluxAttnProcessor", (("to_qkv", ("to_q", "to_k", "to_v")),
                                            ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))),
}


def _fused_layers(name: str, module: nn.Module, groups) -> dict[str, QuantLinear] | None:
    fused = {}
    for target, parts in groups:
        layers = [getattr(module, p, None) for p in parts]
        if all(layer is None for layer in layers):
            continue  # e.g. FLUX's single blocks have no added projections
        if not all(isinstance(layer, QuantLinear) for layer in layers):
            return None
        layer = layers[0].method.fuse(layers, f"{name}.{target}")
        if layer is None:
            return None
        fused[target] = layer
    return fused or None


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse every eligible attention of ``model`` in place; returns the fused modules' names."""
    done = []
    for name, module in model.named_modules():
        entry = FUSABLE.get(type(module).__name__)
        if entry is None or getattr(module, "fused_projections", True):
            continue
        processor, groups = entry
        if type(getattr(module, "processor", None)).__name__ != processor:
            continue  # a custom processor may not honour fused_projections
        fused = _fused_layers(name, module, groups)
        if fused is None:
            continue
        for target, layer in fused.items():
            setattr(module, target, layer)
        for target, parts in groups:
            if target in fused:
                for part in parts:
                    delattr(module, part)  # drop the unfused copies: no weight is held twice
        module.fused_projections = True
        done.append(name)
    return done
