"""Quantization formats by name, for the error when no installed plugin claims a checkpoint.

The core loads no format itself; it only needs to say which format a checkpoint is in and
whether any diffgen plugin handles it, instead of suggesting a plugin that would not help. The
format is named from the declared ``quant_method`` or, with no declaration, from the tensor
names each format writes (``quanto``: ``weight._data`` / ``weight._scale``; bitsandbytes:
``weight.absmax``, ``weight.quant_state.*``; SVDQuant: ``qweight`` / ``wscales`` /
``proj_down``; msmodelslim: ``deq_scale`` / ``quant_bias``).
"""

from __future__ import annotations

import torch

from .checkpoint import UNQUANTIZED_DTYPES

# quant_method (lower case) -> (what it is, the diffgen plugin that loads it, or None)
FORMATS: dict[str, tuple[str, str | None]] = {
    "fp8": ("FP8 (compressed-tensors style)", "diffgen (builtin)"),
    "modelopt": ("NVIDIA ModelOpt HF export", "diffgen-cuda"),
    "modelopt_fp8": ("NVIDIA ModelOpt HF export", "diffgen-cuda"),
    "modelopt_fp4": ("NVIDIA ModelOpt NVFP4 HF export", "diffgen-cuda"),
    "torchao": ("torchao tensor-subclass save", None),
    "quanto": ("optimum-quanto save", None),
    "sdnq": ("SD.Next SDNQ save", None),
    "bitsandbytes": ("bitsandbytes 4/8-bit save", None),
    "gguf": ("GGUF", None),
    "svdquant": ("Nunchaku SVDQuant", "diffgen-nunchaku"),
    "nunchaku": ("Nunchaku SVDQuant", "diffgen-nunchaku"),
    "nunchaku_lite": ("diffusers nunchaku_lite (SVDQuant)", "diffgen-nunchaku"),
    "modelslim": ("Ascend msmodelslim", "diffgen-ascend"),
    "quark": ("AMD Quark (MXFP4)", "diffgen-rocm"),
    "bfl": ("diffusers' BFL fp8r/nvfp4 single-file", None),
}

# tensor-name endings -> the format that writes them
_TENSOR_MARKS = (
    (("weight._data", "weight._scale"), "quanto"),
    (("weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4",
      "weight.quant_state.bitsandbytes__fp4", "SCB"), "bitsandbytes"),
    (("qweight", "wscales", "proj_down", "smooth_factor"), "svdquant"),
    (("deq_scale", "quant_bias"), "modelslim"),
)


def format_of_declaration(method: str) -> str:
    """``torchao`` -> "torchao tensor-subclass save (quant_method 'torchao'): no diffgen plugin loads it"."""
    what, plugin = FORMATS.get(method.lower(), (None, None))
    head = f"{what} (quant_method {method!r})" if what else f"quant_method {method!r}, a format diffgen does not know"
    if plugin is None:
        return f"{head}: no diffgen plugin loads it"
    return f"{head}: {plugin} loads it, but it is not installed or not loaded (see `diffgen plugins`)"


def format_of_tensors(names) -> str | None:
    """The format whose tensor names these are, if the names say."""
    for endings, method in _TENSOR_MARKS:
        if any(n.endswith(e) for n in names for e in endings):
            return format_of_declaration(method)
    return None


def quantized_tensors(tensors: dict) -> dict[str, list[str]]:
    """dtype -> names of the tensors that cannot be 16-bit weights (FP8, integer, packed)."""
    plain = {*UNQUANTIZED_DTYPES, torch.float64, torch.int64, torch.bool}
    out: dict[str, list[str]] = {}
    for name, info in tensors.items():
        if info.dtype not in plain:
            out.setdefault(str(info.dtype).removeprefix("torch."), []).append(name)
    return out


def describe_quantized(groups: dict[str, list[str]]) -> str:
    """"240 float8_e4m3fn (e.g. a.weight, b.weight), 3 uint8 (e.g. c.weight)"."""
    return ", ".join(f"{len(names)} {dtype} (e.g. {', '.join(names[:2])})" for dtype, names in groups.items())
