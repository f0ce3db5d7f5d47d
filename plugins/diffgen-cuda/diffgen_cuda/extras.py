"""Per-layer terms ModelOpt's HF export adds around a quantized GEMM, whatever the format:

  pre_quant_scale  [K]     smoothing (AWQ, SmoothQuant): the layer sees xs = x * pre_quant_scale
  svdquant_lora_a  [r, K]  SVDQuant's low-rank branch on the smoothed input (NVFP4_SVD)
  svdquant_lora_b  [N, r]

  y = linear(xs) + b + (xs @ lora_a^T) @ lora_b^T

``linear`` is the format's quantized GEMM of the smoothed input (its activations quantized with
the smoothed input's input_scale), as ModelOpt's ``SVDQuantLinear`` and smoothed quantizers compute.
Which layers carry them comes from the tensors (``layer_extras``) and travels in the config's
params ``smoothed`` and ``lowrank`` (``params``); a method mixes in :class:`Extras` and writes
its GEMM as ``linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.linear import QuantLinear, ShardError, register_weight
from diffgen.quant import QuantConfig

SMOOTHING, LORA_A, LORA_B = "pre_quant_scale", "svdquant_lora_a", "svdquant_lora_b"


def layer_extras(source, layers) -> tuple[dict[str, int], list[str], str | None]:
    """The quantized ``layers`` exported with extras: ({layer: low-rank branch's rank}, [layers with
    pre_quant_scale], what is wrong with them or None)."""
    tensors = source.tensors
    ranks, smoothed = {}, []
    for prefix in layers:
        if f"{prefix}.{SMOOTHING}" in tensors:
            smoothed.append(prefix)
        a, b = tensors.get(f"{prefix}.{LORA_A}"), tensors.get(f"{prefix}.{LORA_B}")
        if a is None and b is None:
            continue
        if a is None or b is None:
            have, lack = (LORA_A, LORA_B) if b is None else (LORA_B, LORA_A)
            return {}, [], (f"{prefix}.{have} (in {(a or b).file.name}) has no {prefix}.{lack}: the low-rank "
                            "branch is incomplete")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            return {}, [], (f"{prefix}.{LORA_A} {list(a.shape)} and {prefix}.{LORA_B} {list(b.shape)} (in "
                            f"{a.file.name}) are not [rank, K] and [N, rank] of one rank")
        ranks[prefix] = a.shape[0]
    return ranks, sorted(smoothed), None


def params(ranks: dict[str, int], smoothed: list[str]) -> tuple[dict, str]:
    """The config params that carry the extras, and the evidence that names them."""
    out, evidence = {}, ""
    if smoothed:
        out["smoothed"] = tuple(smoothed)
        evidence += f"; {len(smoothed)} smoothed ({SMOOTHING})"
    if ranks:
        out["lowrank"] = tuple(sorted(ranks.items()))
        evidence += (f"; {len(ranks)} with an SVDQuant low-rank branch of rank "
                     f"{'/'.join(str(r) for r in sorted(set(ranks.values())))}")
    return out, evidence


class Extras:
    """Mixed into a LinearMethod: registers the layer's extras and wraps them around ``linear``."""

    smoothed: bool = False
    rank: int = 0

    def init_extras(self, config: QuantConfig, layer_name: str) -> None:
        self.smoothed = layer_name in (config.param("smoothed") or ())
        self.rank = dict(config.param("lowrank") or ()).get(layer_name, 0)

    def create_extras(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        if self.smoothed:
            register_weight(layer, SMOOTHING, (in_features,), dtype)
        if self.rank:
            register_weight(layer, LORA_A, (self.rank, in_features), dtype)
            register_weight(layer, LORA_B, (out_features, self.rank), dtype)

    @property
    def has_extras(self) -> bool:
        return self.smoothed or bool(self.rank)

    def split_refusal(self, fmt: str) -> ShardError:
        """Why a layer with extras is not split for tensor parallelism (``tp_shards`` raises it)."""
        return ShardError(f"{self.name} ({self.layer.name}): diffgen does not split {fmt} layers with AWQ smoothing or "
                          "an SVDQuant low-rank branch for tensor parallelism yet; run it with --ulysses-degree, "
                          "--ring-degree or --cfg-parallel-size")

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The extras around the method's own quantized ``linear``."""
        if not self.has_extras:
            return self.linear(layer, x, bias)
        if self.smoothed:
            x = x * getattr(layer, SMOOTHING)
        y = self.linear(layer, x, bias)
        if self.rank:
            y = y + F.linear(F.linear(x, getattr(layer, LORA_A)), getattr(layer, LORA_B))
        return y

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T + b by this method: the quantized part of the layer."""
        raise NotImplementedError
