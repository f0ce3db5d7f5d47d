"""Per-layer terms ModelOpt's HF export adds around a quantized GEMM, whatever the format:

  pre_quant_scale  [K]     smoothing (AWQ, SmoothQuant): the layer sees xs = x * pre_quant_scale
  svdquant_lora_a  [r, K]  SVDQuant's low-rank branch on the smoothed input (NVFP4_SVD)
  svdquant_lora_b  [N, r]

  y = linear(xs) + b + (xs @ lora_a^T) @ lora_b^T

``linear`` is the format's quantized GEMM of the smoothed input (its activations quantized with
the smoothed input's input_scale), as ModelOpt's ``SVDQuantLinear`` and smoothed quantizers compute.
Which layers carry them comes from the tensors (``layer_extras``) and travels in the config's
params ``smoothed`` and ``lowrank`` (``params``); a method mixes in :class:`Extras` and writes
its GEMM as ``linear``.

A reference method computes those terms as written. A fast method (``fold_extras``) computes the
same sum with fewer passes over the activations, to within bf16 rounding:
  - the smoothing goes into its input quantizer (``linear_smoothed``), so xs is never written;
  - the branch's down projection takes x with the smoothing folded into it, lora_a * s, derived
    at load (``prepare_extras``);
  - the up projection accumulates into the GEMM's output in place (addmm_ with beta 1), instead
    of writing the branch's product and then reading it and the output to write their sum.
Eager only: under torch.compile the terms are written out as above, and Inductor fuses the
multiply into the quantizer and the add into the up projection's consumer itself.

Measured on an H100 (``benchmarks/nvfp4_step.py``, a FLUX.1-dev-sized W4A8 step with a rank-32
branch and smoothing in every layer, ``docs/benchmarks/nvfp4_step_svd_H100.json``): eager, the
written form's GPU time was 204 ms, 26 of them the smoothing multiply and 15 the branch's add; the
folded form's was 177. Compiled, the folded form measured 179 ms (median) against the written
form's 163 (both noisy: 170-188 and 154-181)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.linear import QuantLinear, ShardError, register_weight
from diffgen.quant import QuantConfig

SMOOTHING, LORA_A, LORA_B = "pre_quant_scale", "svdquant_lora_a", "svdquant_lora_b"
FOLDED_A = "_lora_a_smoothed"  # lora_a * pre_quant_scale, a fast method's derived buffer


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
    fold_extras: bool = False  # a fast method: the extras folded as the module docstring says

    def init_extras(self, config: QuantConfig, layer_name: str) -> None:
        self.smoothed = layer_name in (config.param("smoothed") or ())
        self.rank = dict(config.param("lowrank") or ()).get(layer_name, 0)

    def create_extras(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        if self.smoothed:
            register_weight(layer, SMOOTHING, (in_features,), dtype)
        if self.rank:
            register_weight(layer, LORA_A, (self.rank, in_features), dtype)
            register_weight(layer, LORA_B, (out_features, self.rank), dtype)

    def prepare_extras(self, layer: QuantLinear) -> None:
        """A fast method's derived branch (from ``process_weights_after_loading`` or ``fuse``):
        lora_a * s, rounded once to the layer's dtype."""
        if self.fold_extras and self.rank and self.smoothed:
            a, s = getattr(layer, LORA_A), getattr(layer, SMOOTHING)
            layer.register_buffer(FOLDED_A, (a.float() * s.float()).to(a.dtype), persistent=False)

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
        if self.fold_extras and not torch.compiler.is_compiling():
            return self._apply_folded(layer, x, bias)
        if self.smoothed:
            x = x * getattr(layer, SMOOTHING)
        y = self.linear(layer, x, bias)
        if self.rank:
            y = y + F.linear(F.linear(x, getattr(layer, LORA_A)), getattr(layer, LORA_B))
        return y

    def _apply_folded(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.smoothed:
            y = self.linear_smoothed(layer, x, getattr(layer, SMOOTHING), bias)
        else:
            y = self.linear(layer, x, bias)
        if self.rank:
            x2 = x.reshape(-1, x.shape[-1])
            down = F.linear(x2, getattr(layer, FOLDED_A if self.smoothed else LORA_A))
            y.view(-1, y.shape[-1]).addmm_(down, getattr(layer, LORA_B).t())
        return y

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T + b by this method: the quantized part of the layer."""
        raise NotImplementedError

    def linear_smoothed(self, layer: QuantLinear, x: torch.Tensor, smoothing: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """``linear`` of x * smoothing; a fast method whose input quantizer can scale x on the way
        overrides it."""
        return self.linear(layer, x * smoothing, bias)
