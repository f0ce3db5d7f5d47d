"""The LinearMethod contract, the module that holds one, and the prepared-input contract.

A method answers the same three questions as in every inference engine: which tensors a layer
needs (``create_weights``, under the checkpoint's own names), how to turn them into the kernel's
layout once loaded (``process_weights_after_loading``), and the forward (``apply``).

A method may also take its input already prepared, in the form its ``apply`` would otherwise make
of it first (quantized, with scales, packed), from the op before it: a rewritten block
(``diffgen.rewrites``) then computes that op and the preparation in one pass. The contract is
:class:`PreparedInputMethod`; the ops a block may hand over this way are defined below
(``norm_modulate``, ``gelu_concat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DiffgenError
from .finite import check_later
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

    def tp_shards(self, style: str, size: int) -> dict[str, "TensorShard"]:
        """How each of the layer's tensors (by the name ``create_weights`` registered, plus ``bias``)
        splits over ``size`` tensor-parallel ranks: ``style`` "colwise" splits the output features N
        (each rank computes a slice of y), "rowwise" the input features K (each rank a partial sum of
        y, all-reduced after). A tensor left out is replicated. Raise ShardError with the reason
        where the method cannot be split. Default: refuse, naming the method."""
        raise ShardError(f"linear method {self.name} does not say how its tensors split for tensor parallelism "
                         f"({self.layer.name}); run it with --ulysses-degree, --ring-degree or --cfg-parallel-size, "
                         "which keep every linear whole")

    def weight_bytes(self, layer: "QuantLinear") -> int:
        """Bytes the layer's weights take (parameters and buffers, bias included)."""
        tensors = list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        return f"{self.name} ({self.kind})"


@dataclass(frozen=True)
class TensorShard:
    """One tensor's tensor-parallel split: equal parts along ``axis``, each a whole number of
    ``granule`` elements (a scale block: 128 for 128x128 FP8 blocks, 16 for NVFP4's E4M3 scales)."""

    axis: int
    granule: int = 1


class ShardError(DiffgenError):
    """A layer's weights cannot be split over the tensor-parallel ranks asked for."""


def derives_unsplit_tensors(method: LinearMethod, declared: str = "tp_derived") -> bool:
    """Whether ``method`` runs a ``process_weights_after_loading`` written by a class that does not
    declare (in a class attribute named ``declared``) how the tensors it derives split. A format's
    base class declares its own; a subclass that derives more (a kernel's swizzled or shuffled
    copy, held outside the checkpoint tensors) must say so too, or a split would keep its whole
    copy beside the sliced checkpoint tensors. Its ``tp_shards`` refuses when this is True."""
    owner = next(c for c in type(method).__mro__ if "process_weights_after_loading" in c.__dict__)
    return declared not in owner.__dict__


def packed4_tp_shards(method: LinearMethod, style: str, size: int, group: int, blocks: str) -> dict[str, TensorShard]:
    """``tp_shards`` of a 4-bit format stored two codes per byte along K with one scale per
    ``group`` elements (weight [N, Kp/2], weight_scale [N, Kp/group]; ``blocks`` names them, e.g.
    "NVFP4 blocks"). Column-parallel: the rows of weight, weight_scale, bias and of the tensors the
    method derives per row (its ``tp_derived``: name -> the axis along N). Row-parallel: the packed
    columns in whole groups and their scales; per-row derived tensors stay whole; refused where K is
    padded or its groups do not divide. A subclass deriving tensors it does not declare refuses."""
    where = f"{method.name} ({method.layer.name})"
    if derives_unsplit_tensors(method):
        raise ShardError(f"{where} lays out its kernel's own copy of the weights after loading and does not say how "
                         "that copy splits; run it with --ulysses-degree, --ring-degree or --cfg-parallel-size")
    if style == "colwise":
        return {"weight": TensorShard(0), "weight_scale": TensorShard(0), "bias": TensorShard(0),
                **{name: TensorShard(axis) for name, axis in getattr(method, "tp_derived", {}).items()}}
    if style != "rowwise":
        raise ShardError(f"{where}: unknown tensor-parallel style {style!r}")
    k = method.layer.in_features
    if k % group:
        raise ShardError(f"{where}: K = {k} is stored padded to whole {blocks} of {group}, so its columns do not "
                         f"split into {size} equal parts of real features")
    if (k // group) % size:
        raise ShardError(f"{where}: K = {k} is {k // group} {blocks} of {group}, which do not split into {size} "
                         "equal parts of whole blocks")
    return {"weight": TensorShard(1, group // 2), "weight_scale": TensorShard(1)}


class QuantLinear(nn.Module):
    """Stands in for an ``nn.Linear``; the method owns the weights and the forward."""

    def __init__(self, spec: LayerSpec, method: LinearMethod, *, dtype: torch.dtype):
        super().__init__()
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.method = method
        self.compute_dtype = dtype
        # The bias first: some diffusers models cast their input to the dtype of a module's first
        # parameter (Wan's time_embedder), which must be the compute dtype, not FP8 or packed uint8.
        if spec.bias:
            self.bias = nn.Parameter(torch.empty(spec.out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        method.create_weights(self, spec.in_features, spec.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={self.method.describe()}")


# The largest scale whose product with the largest code of any format (FP8's 448 times NVFP4's 6,
# or an int8 127) stays finite in float32 (3.4e38): a larger one dequantizes to infinity.
MAX_SCALE = 1e35
# The smallest normal float32: below it 1 / scale is infinite, and activations are divided by their scale.
MIN_SCALE = torch.finfo(torch.float32).tiny


def check_scales(layer: QuantLinear, *names: str, zero_ok: bool = False) -> None:
    """The named scale tensors of ``layer`` must be finite and positive (or zero, with ``zero_ok``:
    a zero block scale zeroes its block, as NVFP4 writers do for all-zero blocks). A NaN, an
    infinity, a negative or a stray zero scale would load and turn the layer's output into NaN or
    zeros, and the run would still end well; the load stops here instead, naming the tensor. So does a
    scale above MAX_SCALE (the largest codes would dequantize to infinity) or below MIN_SCALE (its
    reciprocal would)."""
    from .errors import LoadError

    for name in names:
        tensor = getattr(layer, name, None)
        if tensor is None:
            continue
        values = tensor.detach().float()
        bad = ~torch.isfinite(values) | (values < 0 if zero_ok else values <= 0) | (values > MAX_SCALE) \
            | ((values > 0) & (values < MIN_SCALE))

        def refuse(name=name, values=values, bad=bad):
            index = int(bad.flatten().nonzero()[0])
            raise LoadError(f"tensor {layer.method.layer.name}.{name} holds {values.flatten()[index].item()} at "
                            f"flat index {index}, outside {'0 or ' if zero_ok else ''}[{MIN_SCALE:.3g}, {MAX_SCALE:g}]: "
                            f"a scale must be finite and {'non-negative' if zero_ok else 'positive'}")

        # During a load onto a GPU the verdict is read with the load's other checks, at its end: a
        # read-back per layer would wait for every copy queued so far.
        check_later(bad.any(), refuse)


def register_weight(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Declare a frozen parameter (the loader fills it from the checkpoint)."""
    layer.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -- prepared inputs --------------------------------------------------------------------------
# The ops a rewritten block may hand to a linear together with the preparation of their output.
# These definitions are the reference every method's prepare_* is held to.
def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) without affine, then ``* (1 + scale) + shift``: x [B, S, K], shift and scale
    [B, K] (adaptive LayerNorm, as DiT blocks modulate their norms)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gelu_concat(a: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """``cat([a, gelu_tanh(h)], -1)``, or ``gelu_tanh(h)`` when ``a`` is None: the activation of a
    feed-forward, and of a block that runs attention and MLP in parallel and projects both at once."""
    y = F.gelu(h, approximate="tanh")
    return y if a is None else torch.cat([a, y], dim=-1)


@runtime_checkable
class PreparedInputMethod(Protocol):
    """A LinearMethod that takes its input already prepared by the op before it.

    ``prepared`` is whatever the method's ``apply`` would make of a 2-D input before its kernel
    (for FP8: the FP8 tensor and its scales); only the method reads it. A rewritten block asks
    ``takes_prepared_input`` first and hands a layer that declines the plain 16-bit value.
    """

    def takes_prepared_input(self, layer: QuantLinear, rows: int | None) -> bool:
        """Whether ``layer`` wants a prepared input of ``rows`` rows (None: of any size; a block is
        rewritten only for layers that say yes). False where preparing in the producer gains
        nothing, or where the method keeps inputs of that size unprepared."""

    def shares_prepared_input(self, layer: QuantLinear, other: QuantLinear) -> bool:
        """Whether one input prepared for ``layer`` is also right for ``other`` (e.g. the same
        activation scale), so a block may prepare it once for both."""

    def prepare_norm_modulate(self, layer: QuantLinear, x: torch.Tensor, shift: torch.Tensor,
                              scale: torch.Tensor, eps: float, keep_value: bool) -> tuple[Any, torch.Tensor | None]:
        """``norm_modulate(x, shift, scale, eps)`` prepared for ``layer`` (as [B * S, K]), and the
        16-bit value itself [B, S, K] when ``keep_value`` (a 16-bit layer reads it too), else None."""

    def prepare_gelu_concat(self, layer: QuantLinear, a: torch.Tensor | None, h: torch.Tensor) -> Any:
        """``gelu_concat(a, h)`` prepared for ``layer`` (as [B * S, K])."""

    def apply_prepared(self, layer: QuantLinear, prepared: Any, bias: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
        """The linear on a prepared input: [rows, out_features] in ``out_dtype``."""


def prepared_input_method(layer: nn.Module, rows: int | None = None) -> PreparedInputMethod | None:
    """``layer``'s method if it is a quantized linear that takes a prepared input of ``rows``
    rows (None: of any size), else None."""
    method = getattr(layer, "method", None) if isinstance(layer, QuantLinear) else None
    if isinstance(method, PreparedInputMethod) and method.takes_prepared_input(layer, rows):
        return method
    return None
