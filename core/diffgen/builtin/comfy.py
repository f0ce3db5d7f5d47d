"""ComfyUI's "mixed precision" quantized files: the per-layer markers, and the tiled NVFP4 scales.

ComfyUI (``comfy/ops.py``, layouts from comfy-kitchen) marks each quantized linear ``L`` itself:
  L.comfy_quant     uint8 [n]   UTF-8 JSON object, e.g. {"format": "nvfp4"}; or, file-wide, the
                                safetensors ``__metadata__["_quantization_metadata"]`` =
                                {"format_version": "1.0", "layers": {"L": {"format": ...}}}
                                (ComfyUI turns the latter into the former when it loads a file).
  format "float8_e4m3fn":  L.weight float8_e4m3fn [N, K]; L.weight_scale fp32 () dequant multiplier
                           (amax / 448); L.input_scale fp32 () optional.  W = fp8 * weight_scale.
  format "nvfp4":          L.weight uint8 [N, K/2], element 2i in the HIGH nibble (comfy-kitchen's
                           default packing, and BFL's FLUX.2-dev NVFP4 file); L.weight_scale
                           float8_e4m3fn in cuBLAS's 128x4 tiled layout, stored as
                           [ceil(N/128)*128, ceil(K/16/4)*4]; L.weight_scale_2 fp32 () global dequant
                           multiplier (amax / (6 * 448)); L.input_scale fp32 () optional.
                           W = e2m1 * weight_scale * weight_scale_2, as in ModelOpt's NVFP4.
Other producers write a header of the same name for single-file runtimes, beside a
``quantization_config`` that names them as its producer; their tensors keep that producer's
layout, so such a header is not read as ComfyUI's markers (:func:`declared_producer`) and the
producer's plugin reads the file.
A scale of that padded shape which is not the row-major shape is tiled whatever the file says; when
N is a multiple of 128 and K/16 of 4 the two shapes are equal and only the marker tells. The markers
are no parameter of any model: :func:`rows_from_tiles` leaves them out of the stream and turns
tiles that the shape betrays into row-major scales before a fused BFL linear is cut; the format
plugins read the markers from the raw file (:func:`read_markers`) and undo the rest at load time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..numerics.nvfp4 import BLOCK, swizzled_to_linear_scales
from ..quant import QuantClaim, QuantConfig, RepackTarget, TensorStream

MARKER = "comfy_quant"
METADATA_KEY = "_quantization_metadata"
PREFIX = "model.diffusion_model."  # ComfyUI's whole-model prefix (bfl.COMFYUI_PREFIX)
FP8, NVFP4 = "float8_e4m3fn", "nvfp4"
LOADABLE = (FP8, NVFP4)
# Formats ComfyUI knows (comfy/quant_ops.py QUANT_ALGOS) that diffgen does not load.
KNOWN_ELSEWHERE = ("float8_e5m2", "mxfp8", "int8_tensorwise", "convrot_w4a4", "asym_w4a8_int8", "awq_w4a16",
                   "int8_blockwise")
E4M3 = torch.float8_e4m3fn
# The family of the claim that reports a broken marker: no plugin can load such a file.
FAMILY = "comfyui"


@dataclass(frozen=True)
class Marker:
    layer: str  # the layer's name in the file, without ComfyUI's prefix
    format: str
    where: str  # "file F, tensor T" or "file F, __metadata__[_quantization_metadata]"
    full_precision: bool = False  # "full_precision_matrix_mult": ComfyUI keeps the matmul 16-bit


class MarkerError(ValueError):
    """A marker that cannot be read; the message names the file and tensor or metadata key."""


def tiled_shape(rows: int, cols: int) -> tuple[int, int]:
    """The stored shape of a [rows, cols] block-scale grid in the 128x4 tiled layout."""
    return -(-rows // 128) * 128, -(-cols // 4) * 4


def scale_cols(packed_cols: int) -> int:
    """Block scales per row of a weight stored as [N, packed_cols] uint8 (two codes a byte)."""
    return -(-2 * packed_cols // BLOCK)


def _parse(text: str | bytes, where: str) -> dict:
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MarkerError(f"{where} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(value, dict):
        raise MarkerError(f"{where} holds {type(value).__name__} JSON, not an object such as {{\"format\": \"nvfp4\"}}")
    return value


def _marker(layer: str, conf: dict, where: str) -> Marker:
    fmt = conf.get("format")
    if not isinstance(fmt, str):
        raise MarkerError(f"{where} has no \"format\" string (got {conf!r})")
    return Marker(layer, fmt, where, conf.get("full_precision_matrix_mult") is True)


def raw_source(source):
    """The file as stored: a source seen in the model's layout keeps its raw one as ``raw``."""
    return getattr(source, "raw", source)


def declared_producer(metadata: dict | None) -> str | None:
    """The producer a safetensors header's ``quantization_config`` names (``producer.name``), or None."""
    try:
        producer = json.loads((metadata or {}).get("quantization_config") or "{}").get("producer")
    except (json.JSONDecodeError, AttributeError):
        return None
    name = producer.get("name") if isinstance(producer, dict) else None
    return name if isinstance(name, str) else None


def read_markers(source) -> dict[str, Marker]:
    """Every layer's marker, from its ``.comfy_quant`` tensor and the files' metadata, by the layer's
    name in the file (prefix removed). Raises :class:`MarkerError` for a marker that cannot be read
    or for a tensor and the metadata that disagree on a layer."""
    raw = raw_source(source)
    out: dict[str, Marker] = {}
    for path, metadata in (getattr(raw, "metadata", None) or {}).items():
        text = (metadata or {}).get(METADATA_KEY)
        if text is None or declared_producer(metadata):
            continue
        where = f"file {path}, __metadata__[{METADATA_KEY!r}]"
        layers = _parse(text, where).get("layers")
        if not isinstance(layers, dict):
            raise MarkerError(f"{where} has no \"layers\" object")
        for name, conf in layers.items():
            if not isinstance(conf, dict):
                raise MarkerError(f"{where}: layer {name!r} is {conf!r}, not an object with a \"format\"")
            layer = name.removeprefix(PREFIX)
            out[layer] = _marker(layer, conf, f"{where}, layer {name!r}")
    for name, info in raw.tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != MARKER:
            continue
        where = f"file {info.file}, tensor {name!r}"
        if info.dtype != torch.uint8 or len(info.shape) != 1:
            raise MarkerError(f"{where} is {str(info.dtype).removeprefix('torch.')} {list(info.shape)}, not the "
                              "uint8 bytes of a JSON object")
        layer = module.removeprefix(PREFIX)
        marker = _marker(layer, _parse(bytes(raw.read(name).tolist()), where), where)
        if layer in out and out[layer].format != marker.format:
            raise MarkerError(f"{where} says {marker.format!r} but {out[layer].where} says {out[layer].format!r}")
        out[layer] = marker
    return out


def _stripped(raw) -> dict:
    return {name.removeprefix(PREFIX): info for name, info in raw.tensors.items()}


def layer_problem(marker: Marker, tensors: dict) -> str | None:
    """What in the layer's tensors contradicts its marker, or None. ``tensors``: the file's infos by
    name without ComfyUI's prefix."""
    if marker.format not in LOADABLE:
        known = "a ComfyUI format diffgen does not load" if marker.format in KNOWN_ELSEWHERE else "an unknown format"
        return (f"{marker.where} names {marker.format!r}, {known}; diffgen loads ComfyUI's "
                f"{' and '.join(repr(f) for f in LOADABLE)} layers")
    weight = tensors.get(f"{marker.layer}.weight")
    if weight is None:
        return f"{marker.where} marks layer {marker.layer!r}, which has no weight in the file"
    dtype = str(weight.dtype).removeprefix("torch.")
    if marker.format == FP8:
        if weight.dtype != E4M3:
            return f"{marker.where} says {FP8} but {marker.layer}.weight is {dtype}"
        return None
    scale, scale_2 = tensors.get(f"{marker.layer}.weight_scale"), tensors.get(f"{marker.layer}.weight_scale_2")
    if weight.dtype != torch.uint8 or len(weight.shape) != 2:
        return (f"{marker.where} says {NVFP4} but {marker.layer}.weight is {dtype} {list(weight.shape)}, "
                "not packed uint8")
    if scale is None or scale_2 is None:
        missing = [f"{marker.layer}.{leaf}" for leaf, t in (("weight_scale", scale), ("weight_scale_2", scale_2))
                   if t is None]
        return f"{marker.where} says {NVFP4} but the file has no {' or '.join(missing)}"
    rows, cols = weight.shape[0], scale_cols(weight.shape[1])
    if scale.dtype != E4M3 or tuple(scale.shape) != tiled_shape(rows, cols):
        return (f"{marker.where} says {NVFP4}, whose block scales are 128x4-tiled, so "
                f"{marker.layer}.weight_scale should be float8_e4m3fn {list(tiled_shape(rows, cols))} for a weight of "
                f"{list(weight.shape)}; it is {str(scale.dtype).removeprefix('torch.')} {list(scale.shape)}")
    if scale_2.numel != 1:
        return f"{marker.where}: {marker.layer}.weight_scale_2 has {scale_2.numel} values, not one"
    return None


def markers_problem(source) -> str | None:
    """Why the file's markers cannot be loaded (unreadable, unknown format, a contradiction with a
    tensor, layers in two formats), or None."""
    try:
        markers = read_markers(source)
    except MarkerError as e:
        return str(e)
    if not markers:
        return None
    tensors = _stripped(raw_source(source))
    for marker in markers.values():
        problem = layer_problem(marker, tensors)
        if problem:
            return problem
    formats = sorted({m.format for m in markers.values()})
    if len(formats) > 1:
        counts = ", ".join(f"{sum(m.format == f for m in markers.values())} {f}" for f in formats)
        return f"the file mixes ComfyUI formats ({counts}); diffgen loads one quantization format per checkpoint"
    return None


def problem_claim(source) -> QuantClaim | None:
    """A claim that names the broken marker, outranking every claim that would load the file."""
    problem = markers_problem(source)
    if problem is None:
        return None
    evidence = "ComfyUI per-layer quantization markers (comfy_quant / _quantization_metadata)"
    return QuantClaim(QuantConfig.make(FAMILY, provenance=evidence), 40, evidence, unsupported_reason=problem)


def rows_from_tiles(tensors: TensorStream, target: RepackTarget,
                    modules_of: Callable[[str], list[str]]) -> TensorStream:
    """The layout pass: markers left out, and every float8_e4m3fn ``weight_scale`` stored in the
    padded tiled shape (not the row-major one) turned row-major. ``modules_of(module)`` names the
    model's linears a stored one feeds (a fused BFL linear feeds several); their 16-bit weights in
    ``target.expected`` give the grid. Acts on the layout target only, where ``expected`` holds the
    model's 16-bit weights; a tiled scale whose shape equals the row-major one is left to the
    format plugin, which knows from the markers."""

    def grid(module: str) -> tuple[int, int] | None:
        shapes = [target.expected.get(f"{m}.weight") for m in (modules_of(module) or [module])]
        if not shapes or any(s is None or len(s[0]) != 2 for s in shapes):
            return None
        return sum(s[0][0] for s in shapes), -(-shapes[0][0][1] // BLOCK)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            module, _, leaf = name.removeprefix(PREFIX).rpartition(".")
            if leaf == MARKER:
                continue
            if leaf == "weight_scale" and tensor.dtype == E4M3 and tensor.dim() == 2 and target.kind == "layout":
                rows_cols = grid(module)
                if rows_cols and tuple(tensor.shape) == tiled_shape(*rows_cols) != rows_cols:
                    tensor = swizzled_to_linear_scales(tensor, *rows_cols).contiguous()
            yield name, tensor

    return stream()

