"""``diffgen quantize --quantization fp8``: the fp8 checkpoint a 16-bit transformer becomes.

The weights are what online ``--quantization fp8`` computes while loading (``quantize_weight``
with the scheme: per-channel, per-tensor or 128x128 blocks), written under HF / vLLM fp8 names with
``quant_method: "fp8"``, dynamic activations, and the layers kept in 16-bit as ``ignored_layers``.
"""

from __future__ import annotations

import torch

from ..numerics.fp8 import dequantize_fp8, dequantize_fp8_block
from ..quant import QuantConfig, RepackTarget, TensorStream
from ..tools.quantize import Quantizer
from .fp8_methods import BLOCK, SCHEMES, quantize_weight

# e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself; values near
# the bottom of the range (subnormals) carry an absolute error of at most scale * 2^-10.
_REL_TOL = 2.0 ** -4


def quantization_config(config: QuantConfig, kept: list[str]) -> dict:
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": list(kept)}
    if config.scheme == "block":
        qc["weight_block_size"] = list(BLOCK)
    return qc


def checkpoint_stream(config: QuantConfig, tensors: TensorStream, target: RepackTarget) -> TensorStream:
    """16-bit weights of the planned layers -> their fp8 tensors; everything else as it comes."""
    quantized = set(target.quantized)
    scheme = config.scheme or SCHEMES[0]
    for name, tensor in tensors:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in quantized:
            for suffix, t in quantize_weight(tensor, scheme).items():
                yield f"{prefix}.{suffix}", t
        else:
            yield name, tensor


def check_layer(layer: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> str | None:
    """Whether the written tensors decode to ``weight`` within FP8 rounding."""
    q = tensors["weight"]
    if q.dtype != torch.float8_e4m3fn:
        return f"weight is {q.dtype}, not float8_e4m3fn"
    if "weight_scale_inv" in tensors:
        scale = tensors["weight_scale_inv"]
        decoded = dequantize_fp8_block(q, scale, BLOCK)
        scale = scale.max()
    else:
        scale = tensors["weight_scale"]
        scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale
        decoded = dequantize_fp8(q, scale)
    ref = weight.float()
    bound = _REL_TOL * ref.abs() + scale * 2.0 ** -9 + 1e-30
    if not bool(((decoded - ref).abs() <= bound).all()):
        return "decodes to values further from the 16-bit weight than FP8 rounding allows"
    return None


QUANTIZER = Quantizer(
    summary="FP8 e4m3 weights (HF fp8 checkpoint), dynamic per-token activations",
    schemes=SCHEMES,
    quantization_config=quantization_config,
    check_layer=check_layer,
)
