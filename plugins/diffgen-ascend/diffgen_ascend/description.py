"""Detection of msmodelslim checkpoints from ``quant_model_description*.json``.

The description is one flat JSON object: ``"<tensor name>": "<TYPE>"`` for every saved tensor
(``FLOAT`` for 16-bit ones), plus keys such as ``model_quant_type``, ``version``, ``group_size``,
``metadata``. A layer's scheme is the type of its ``<layer>.weight`` (SGLang and vllm-ascend read
it so). ``quant_model_description.json`` is read if present, else the first of the sorted
``quant_model_description*.json`` (the MindIE saver writes ``..._w8a8_mxfp8.json``). The
description needs no flag and wins: it is the declaration, confirmed here tensor by tensor;
names are compared in the model's names (``names.py``: Wan's originals, smoothing wrappers).
"""

from __future__ import annotations

import torch

from diffgen.checkpoint import UNQUANTIZED_DTYPES
from diffgen.quant import QuantClaim, QuantConfig

from . import schemes
from .names import is_wan_original_name, strip_wrappers, wan_original_to_diffusers_name

FAMILY = "msmodelslim"
PREFIX = "quant_model_description"
SUPPORTED = ", ".join(schemes.SCHEMES)
# Description keys that are not tensors.
META_KEYS = {"model_quant_type", "version", "group_size", "metadata", "optional", "kv_cache_type",
             "kv_quant_type", "fa_quant_type", "timestep_policy", "mxfp4_scale_alg", "mxfp4_dst_type_max"}


def description_file(sidecars: dict) -> str | None:
    names = sorted(n for n in sidecars if n.startswith(PREFIX) and n.endswith(".json"))
    if f"{PREFIX}.json" in names:
        return f"{PREFIX}.json"
    return names[0] if names else None


def model_name(raw: str, tensors) -> str:
    """A description key (or tensor name) in the model's names, given the checkpoint's tensor names
    as the model sees them (``tensors``)."""
    name = wan_original_to_diffusers_name(raw) if is_wan_original_name(raw) else raw
    return strip_wrappers(name, lambda layer: f"{layer}.weight" in tensors)


def _layer_entries(description: dict, tensors) -> tuple[dict[str, str], list[str]]:
    """layer -> TYPE from the ``.weight`` entries; and the problems with non-string entries."""
    layers, problems = {}, []
    for key, value in description.items():
        if key in META_KEYS or key.endswith(".quant_type"):
            continue
        if not isinstance(value, str):
            problems.append(f"entry {key!r} is {value!r}, not a type name")
            continue
        name = model_name(key, tensors)
        if name.endswith(".weight"):
            layers[name[: -len(".weight")]] = value.upper()
    return layers, problems


def _check_layer(layer: str, scheme: str, tensors, where: str) -> str | None:
    """What in the tensors contradicts ``scheme`` for ``layer``, or None."""
    weight = tensors.get(f"{layer}.weight")
    if weight is None:
        return f"{where} lists {layer}.weight as {scheme}, but the weights have no tensor {layer}.weight"
    if len(weight.shape) != 2:
        return f"tensor {layer}.weight is {list(weight.shape)}, not a 2-D linear weight"
    n = weight.shape[0]
    k = 2 * weight.shape[1] if scheme in ("W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE") else weight.shape[1]
    fp8_fp4 = scheme == "W4A4_MXFP4" and weight.dtype == torch.float8_e4m3fn  # pre-2026-04 exports
    if fp8_fp4:
        k = weight.shape[1]
    smooth = f"{layer}.mul_scale" in tensors
    offset = f"{layer}.weight_offset" in tensors
    for suffix, (shape, dtype) in schemes.tensor_specs(scheme, n, k, weight_offset=offset, smooth=smooth).items():
        name = f"{layer}.{suffix}"
        info = tensors.get(name)
        if info is None:
            return f"{where} says {layer} is {scheme}, which needs tensor {name}; the weights do not have it"
        allowed = {dtype}
        if suffix == "weight" and fp8_fp4:
            allowed = {torch.float8_e4m3fn}
        elif suffix == "deq_scale":
            allowed = {torch.float32, torch.int64}
        elif dtype == torch.float32:
            allowed = set(UNQUANTIZED_DTYPES)
        if info.dtype not in allowed:
            return (f"tensor {name} is {str(info.dtype).removeprefix('torch.')}, but {where} says {layer} is {scheme}, "
                    f"which stores it as {' or '.join(sorted(str(d).removeprefix('torch.') for d in allowed))}")
        if suffix == "weight" and fp8_fp4:
            continue  # one E2M1 value per FP8 byte; repack packs it
        if torch.Size(info.shape).numel() != torch.Size(shape).numel():
            if suffix in ("weight_scale", "weight_offset") and scheme in schemes.QMAX and len(info.shape) == 2:
                return (f"tensor {name} is {list(info.shape)}: per-group {scheme} (group size "
                        f"{k // max(info.shape[1], 1)}) is not supported; per-channel [{n}, 1] is")
            return f"tensor {name} is {list(info.shape)}; {scheme} with weight {list(weight.shape)} needs {list(shape)}"
    return None


def detect(source) -> QuantClaim | None:
    file = description_file(source.sidecars)
    if file is None:
        return None
    description = source.sidecars[file]
    where = f"{file} in {source.root}" if source.root else file
    tensors = source.tensors
    layers, problems = _layer_entries(description, tensors)
    quantized = {layer: t for layer, t in layers.items() if t != "FLOAT"}
    unknown = sorted({t for t in quantized.values() if t not in schemes.SCHEMES})
    evidence = (f"{where}: {len(quantized)} quantized layers "
                f"({', '.join(f'{sum(v == t for v in quantized.values())} {t}' for t in sorted(set(quantized.values())))})"
                f", {len(layers) - len(quantized)} FLOAT")

    def refuse(reason: str) -> QuantClaim:
        return QuantClaim(QuantConfig.make(FAMILY, provenance=where), 30, evidence, unsupported_reason=reason)

    if problems:
        return refuse(f"{where} is not a msmodelslim description: {problems[0]}")
    if unknown:
        known = [t for t in unknown if t in schemes.KNOWN_UNSUPPORTED]
        what = "msmodelslim types diffgen does not load" if known else "types msmodelslim does not write"
        layer = next(n for n, t in quantized.items() if t == unknown[0])
        return refuse(f"{where} has {what}: {', '.join(unknown)} (e.g. {layer}.weight); supported: {SUPPORTED}")
    for layer, scheme in quantized.items():
        problem = _check_layer(layer, scheme, tensors, where)
        if problem:
            return refuse(problem)
    described = {model_name(k, tensors) for k in description if k not in META_KEYS}
    for name, info in tensors.items():
        if info.dtype not in (*UNQUANTIZED_DTYPES, torch.float64) and name not in described:
            return refuse(f"tensor {name} is {str(info.dtype).removeprefix('torch.')} but {where} does not list it")
        layer = name.rpartition(".")[0]
        if name.endswith(".weight") and layers.get(layer) == "FLOAT" and info.dtype not in UNQUANTIZED_DTYPES:
            return refuse(f"{where} says {name} is FLOAT, but the tensor is {str(info.dtype).removeprefix('torch.')}")
    # FLOAT layers, and linears the description leaves out whose weight is 16-bit, stay 16-bit.
    kept = {name[: -len(".weight")] for name, info in tensors.items()
            if name.endswith(".weight") and len(info.shape) == 2 and info.dtype in UNQUANTIZED_DTYPES}
    ignore = tuple(sorted((kept | {layer for layer, t in layers.items() if t == "FLOAT"}) - set(quantized)))
    smooth = tuple(sorted(layer for layer in quantized if f"{layer}.mul_scale" in tensors))
    params = {"description": file,
              "smooth_layers": smooth,
              "no_weight_offset": tuple(sorted(layer for layer, t in quantized.items()
                                               if t in schemes.QMAX and f"{layer}.weight_offset" not in tensors))}
    for key in ("mxfp4_scale_alg", "mxfp4_dst_type_max"):
        if key in description:
            params[key] = description[key]
    declared = str(description.get("model_quant_type", "")).upper()
    scheme = declared if declared in quantized.values() else (max(set(quantized.values()), key=list(
        quantized.values()).count) if quantized else None)
    config = QuantConfig.make(FAMILY, scheme=scheme, params=params, layer_schemes=quantized, ignore=ignore,
                              provenance=where)
    return QuantClaim(config, 30, evidence + (f"; {len(smooth)} smoothed (div.mul_scale)" if smooth else ""))
