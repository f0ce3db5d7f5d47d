"""NVFP4 files for ComfyUI: BFL's FLUX.2-dev NVFP4 single files and ComfyUI "mixed precision" files.

Tensors per quantized linear (comfy-kitchen's ``TensorCoreNVFP4Layout``; diffgen.builtin.comfy):
  weight          uint8 [N, K/2]                          E2M1 codes, element 2i in the HIGH nibble
  weight_scale    float8_e4m3fn [ceil(N/128)*128, ceil(K/64)*4]   block scales, cuBLAS 128x4 tiles
  weight_scale_2  fp32 ()                                 global dequant multiplier, amax / (6 * 448)
  input_scale     fp32 ()                                 optional (BFL's "-mixed" file has none)
Forward: ModelOpt's NVFP4 (nvfp4.py) once the nibbles are swapped and the tiles put back in rows:
y = q(x) @ (e2m1 * weight_scale * weight_scale_2)^T + b.

The file says so itself: per-layer ``comfy_quant`` markers or the ``_quantization_metadata`` header
naming ``nvfp4``, or a ``weight_scale`` stored in the padded tiled shape (not the row-major one).
This module turns that into the ``nvfp4`` config's layout parameters (``swap_weight_nibbles``,
``weight_scale_layout: swizzled``), which ``nvfp4.runtime_layout`` applies while the weights stream
in; tiles the shape betrays are made row-major earlier, before BFL's fused linears are cut
(``diffgen.builtin.comfy.rows_from_tiles``). A config.json that declares the opposite layout is a
contradiction, reported with its file and tensor.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from diffgen.builtin import bfl
from diffgen.builtin import comfy as markers
from diffgen.quant import QuantClaim

from . import nvfp4

E4M3 = torch.float8_e4m3fn
LAYOUT = {"swap_weight_nibbles": True, "weight_scale_layout": "swizzled"}


def _nvfp4_layers(raw) -> dict[str, tuple]:
    """The raw file's NVFP4 layers (prefix removed): name -> (weight shape, scale shape)."""
    tensors = {n.removeprefix(markers.PREFIX): t for n, t in raw.tensors.items()}
    out = {}
    for name, info in tensors.items():
        if not (name.endswith(".weight") and info.dtype == torch.uint8 and len(info.shape) == 2):
            continue
        layer = name[: -len(".weight")]
        scale = tensors.get(f"{layer}.weight_scale")
        if scale is not None and scale.dtype == E4M3 and len(scale.shape) == 2:
            out[layer] = (tuple(info.shape), tuple(scale.shape))
    return out


def _grid(weight: tuple) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the row-major block-scale shape of a packed weight, its tiled shape)."""
    rows_cols = (weight[0], markers.scale_cols(weight[1]))
    return rows_cols, markers.tiled_shape(*rows_cols)


def comfy_evidence(source) -> tuple[str | None, str | None]:
    """(what says this file is laid out for ComfyUI, or None; a contradiction inside the file, or None)."""
    raw = markers.raw_source(source)
    try:
        marked = {m.layer: m for m in markers.read_markers(source).values() if m.format == markers.NVFP4}
    except markers.MarkerError:
        return None, None  # the builtin bfl plugin's claim names the broken marker
    layers = _nvfp4_layers(raw)
    tiled = [layer for layer, (w, s) in layers.items() if s == _grid(w)[1] != _grid(w)[0]]
    row_major = [layer for layer, (w, s) in layers.items() if s == _grid(w)[0] != _grid(w)[1]]
    if marked:
        first = next(iter(marked.values()))
        more = ", ..." if len(marked) > 1 else ""
        evidence = f"ComfyUI marks {len(marked)} layers {markers.NVFP4} ({first.where}{more})"
    elif tiled:
        evidence = (f"{tiled[0]}.weight_scale is stored {list(layers[tiled[0]][1])}, the 128x4-tiled shape of "
                    f"{list(_grid(layers[tiled[0]][0])[0])} block scales ({len(tiled)} such layers), as ComfyUI's "
                    "NVFP4 stores them; its packing (high nibble first) is assumed")
    else:
        return None, None
    if row_major:
        return evidence, (f"{row_major[0]}.weight_scale is stored row-major {list(layers[row_major[0]][1])} while "
                          f"{evidence.split(' (')[0]}: one file, two block-scale layouts")
    return evidence, _fused_tiles_problem(source, raw, layers)


def _fused_tiles_problem(source, raw, layers: dict[str, tuple]) -> str | None:
    """A fused BFL linear whose tiled scales look row-major (N a multiple of 128, K/16 of 4) is cut
    into its parts before the tiles are undone; that is exact only when every part spans whole
    128-row tiles (true at every real FLUX size)."""
    table = bfl.RULES.get(source.config.get("_class_name"))
    if table is None:
        return None
    for layer, (weight, scale) in layers.items():
        rows_cols, tiled = _grid(weight)
        found = table.match(layer)
        if scale != rows_cols or rows_cols != tiled or found is None:
            continue
        rule, targets = found
        parts = [weight[0] // 2] * 2 if rule.swap else \
            [source.tensors[f"{t}.weight"].shape[0] for t in targets if f"{t}.weight" in source.tensors]
        if len(parts) > 1 and any(p % 128 for p in parts):
            return (f"{layer}.weight_scale holds 128x4 tiles over {weight[0]} rows, which diffgen cuts into parts of "
                    f"{parts} rows; tiles cannot be cut off a multiple of 128 rows")
    return None


def with_comfy_layout(claim: QuantClaim, source, declared: dict | None, declared_in: str) -> QuantClaim:
    """``claim`` (an nvfp4 claim) with ComfyUI's layout when the file says so; an unsupported claim
    when ``declared`` (the config's quantization_config) says otherwise."""
    if claim.config.family != nvfp4.FAMILY:
        return claim
    evidence, problem = comfy_evidence(source)
    if evidence is None:
        return claim
    declared = declared if isinstance(declared, dict) else {}
    if "swap_weight_nibbles" in declared and not declared["swap_weight_nibbles"]:
        problem = problem or (f"quantization_config in {declared_in} says swap_weight_nibbles="
                              f"{declared['swap_weight_nibbles']!r} (low nibble first), but {evidence}: ComfyUI's "
                              "NVFP4 packs the high nibble first. Remove the key or set it to true")
    layout = declared.get("checkpoint_weight_scale_layout")
    if layout is not None and layout != "swizzled":
        problem = problem or (f"quantization_config in {declared_in} says checkpoint_weight_scale_layout={layout!r}, "
                              f"but {evidence}: ComfyUI's NVFP4 block scales are 128x4-tiled. Remove the key or set "
                              "it to 'swizzled'")
    config = replace(claim.config, params=tuple(sorted({**dict(claim.config.params), **LAYOUT}.items())))
    return QuantClaim(config, max(claim.specificity, 30), f"{claim.evidence}; {evidence}",
                      unsupported_reason=claim.unsupported_reason or problem)
