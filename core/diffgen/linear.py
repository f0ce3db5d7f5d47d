"""The LinearMethod contract and the module that holds one.

A method answers the same three questions as in every inference engine: which tensors a layer
needs (``create_weights``, under the checkpoint's own names), how to turn them into the kernel's
layout once loaded (``process_weights_after_loading``), and the forward (``apply``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from .quant import LayerSpec, QuantConfig

Kind = Literal["native", "weight-only", "reference"]
KIND_RANK: dict[str, int] = {"native": 0, "weight-only": 1, "reference": 2}


class LinearMethod:
    """Base class of every quantized linear implementation.

    Subclasses set ``name``, ``kind`` (and ``priority`` to outrank another plugin's method of
    the same kind) and implement the three methods. An offer that cannot run
    on this platform is still made, with ``unavailable_reason`` saying why.
    """

    name: ClassVar[str] = "abstract"
    kind: ClassVar[Kind] = "reference"
    priority: ClassVar[int] = 0  # among offers of the same kind, higher wins (a faster kernel)
    # True (for the class or one instance) when the method takes inputs quantized by fused
    # producers: it then implements quantize_norm_modulate, quantize_gelu_concat, apply_quantized
    # and weight_only (diffgen.fused_blocks).
    fuses_producers: bool = False

    def __init__(self, config: QuantConfig, layer: LayerSpec, *, unavailable_reason: str | None = None):
        self.config = config
        self.layer = layer
        self.unavailable_reason = unavailable_reason

    def create_weights(self, layer: "QuantLinear", in_features: int, out_features: int,
                       dtype: torch.dtype) -> None:
        """Register the parameters the checkpoint provides (on whatever device is current)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: "QuantLinear") -> None:
        """Convert loaded tensors to the kernel's layout, on the layer's device. Default: nothing."""

    def apply(self, layer: "QuantLinear", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def fuse(self, layers: list["QuantLinear"], name: str) -> "QuantLinear | None":
        """One layer whose output is ``layers``' outputs concatenated (they share their input), or
        None. Say None unless the fused layer computes exactly the same numbers. Default: None."""
        return None

    def weight_bytes(self, layer: "QuantLinear") -> int:
        """Bytes the layer's weights take (parameters and buffers, bias included)."""
        tensors = list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        return f"{self.name} ({self.kind})"


class QuantLinear(nn.Module):
    """Stands in for an ``nn.Linear``; the method owns the weights and the forward."""

    def __init__(self, spec: LayerSpec, method: LinearMethod, *, dtype: torch.dtype):
        super().__init__()
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.method = method
        self.compute_dtype = dtype
        method.create_weights(self, spec.in_features, spec.out_features, dtype)
        if spec.bias:
            self.bias = nn.Parameter(torch.empty(spec.out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={self.method.describe()}")


def register_weight(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Declare a frozen parameter (the loader fills it from the checkpoint)."""
    layer.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
