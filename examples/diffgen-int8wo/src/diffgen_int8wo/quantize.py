"""The int8wo quantizer (entry point ``int8wo`` in group ``diffgen.quantizers``), so that
``diffgen quantize SRC DST --quantization int8wo`` writes an int8wo checkpoint.

diffgen's driver does the rest: it plans the layers as online ``--quantization int8wo`` would,
streams the weights through this plugin's ``repack_checkpoint``, writes atomically, then re-reads
the output and calls ``check_layer`` on every quantized layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffgen.tools.quantize import Quantizer

from .format import QUANT_METHOD, SCHEMES, dequantize_weight, quantization_config


def check_layer(layer: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> str | None:
    """Round-to-nearest moves a weight by at most half a step; fp32 rounding of w / scale and
    q * scale adds up to ~127 * 2^-23 of a step, well inside 1e-4."""
    q, scale = tensors.get("weight"), tensors.get("weight_scale")
    if q is None or scale is None or q.dtype != torch.int8:
        return f"expected an int8 weight and a weight_scale, found {sorted(tensors)}"
    bound = scale.float().reshape(-1, 1) * (0.5 + 1e-4)
    if not bool(((dequantize_weight(q, scale) - weight.float()).abs() <= bound).all()):
        return "a weight differs from the source by more than half a quantization step"
    return None


QUANTIZER = Quantizer(
    summary="int8 weights, one fp32 scale per output channel, 16-bit activations (the example plugin)",
    schemes=SCHEMES,
    quantization_config=lambda config, kept: quantization_config(kept),
    check_layer=check_layer,
)


def write_fixture(src: Path, dst: Path) -> None:
    """Conformance fixture writer (entry point group ``diffgen.fixtures``)."""
    import diffgen

    diffgen.quantize(src, dst, quantization=QUANT_METHOD)


__all__ = ["QUANTIZER", "check_layer", "write_fixture"]
