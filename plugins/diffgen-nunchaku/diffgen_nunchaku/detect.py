"""Recognise an SVDQuant checkpoint, and the per-layer formats its QuantConfig carries.

Evidence, each checked against the others (a contradiction is a claim that cannot load):
- file names ``svdq-(int4|fp4)_r{rank}-*.safetensors`` (one file, or files in a directory);
- safetensors ``__metadata__``: ``quantization_config`` (``method: svdquant``, ``weight.dtype``
  ``int4`` / ``fp4_e2m1_all``, ``rank``; nunchaku writes no ``quant_method``), ``model_class``
  (``Nunchaku...``) and ``config`` (the diffusers config, whose ``_class_name`` must be the model's);
- tensors, in the model's names after the layout repack: ``qweight`` uint8 with ``wscales``,
  ``proj_down``, ``proj_up``, ``smooth_factor`` (SVDQ W4A4), or with ``wzeros`` (AWQ W4A16);
  ``wscales`` in float8_e4m3fn means nvfp4 (group 16), in 16-bit int4 (group 64);
- the user's flags (``--enable-svdquant``, ``--quantization-precision``, ``--quantization-rank``),
  which outrank all of it and must agree with it;
- diffusers' own loader for nunchaku's tensors (``quant_method: nunchaku_lite`` in config.json:
  ``svdq_w4a4`` {precision, group_size, rank, targets} and ``awq_w4a16`` {targets}): the same packed
  tensors per diffusers linear, every activation quantized signed (diffusers' SVDQW4A4Linear never
  sets act_unsigned); its targets must be the layers the tensors show.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.checkpoint import linears_stored_unquantized
from diffgen.quant import QuantClaim, QuantConfig

from .names import NUNCHAKU_CLASSES, proj_out_split, unsigned_int4

FAMILY = "svdquant"
FILE_NAME = re.compile(r"svdq-(int4|fp4)_r(\d+)")
PRECISIONS = {"int4": "int4", "fp4": "nvfp4", "nvfp4": "nvfp4", "fp4_e2m1_all": "nvfp4"}
GROUP = {"int4": 64, "nvfp4": 16}


@dataclass(frozen=True)
class Part:
    """A slice of a linear's input with its own rank and activation sign."""

    k: int
    rank: int
    unsigned: bool = False


@dataclass(frozen=True)
class LayerFormat:
    """``svdq 3072r32+12288r32u`` (two input parts, the second unsigned) or ``awq-w4a16``."""

    kind: str
    parts: tuple[Part, ...] = ()

    def encode(self) -> str:
        if self.kind == "awq":
            return "awq-w4a16"
        return "svdq " + "+".join(f"{p.k}r{p.rank}{'u' if p.unsigned else ''}" for p in self.parts)

    @classmethod
    def parse(cls, text: str) -> "LayerFormat":
        if text == "awq-w4a16":
            return cls("awq")
        parts = tuple(Part(int(k), int(r), bool(u)) for k, r, u in re.findall(r"(\d+)r(\d+)(u?)", text))
        return cls("svdq", parts)

    @property
    def rank(self) -> int:
        return sum(p.rank for p in self.parts)


def layer_format(config: QuantConfig, layer: str) -> LayerFormat:
    return LayerFormat.parse(config.scheme_for(layer) or "")


def _metadata(source) -> tuple[dict, list[str]]:
    """The nunchaku keys of every file's metadata, merged, and where each came from."""
    found, where = {}, []
    for path, meta in (getattr(source, "metadata", None) or {}).items():
        for key in ("quantization_config", "model_class", "config"):
            if key in meta and key not in found:
                value = meta[key]
                if key != "model_class":
                    try:
                        value = json.loads(value)
                    except ValueError:
                        continue
                found[key] = value
                where.append(f"{key} in the metadata of {Path(path).name}")
    return found, where


def _is_svdquant_declaration(qc) -> bool:
    if not isinstance(qc, dict):
        return False
    method = str(qc.get("method", qc.get("quant_method", ""))).lower()
    return method in ("svdquant", "nunchaku") or ("weight" in qc and "rank" in qc and "quant_method" not in qc)


def lite_config(qc) -> dict | None:
    """diffusers' nunchaku_lite quantization_config, or None."""
    return qc if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "nunchaku_lite" else None


def _lite_targets(lite: dict, formats: dict[str, LayerFormat]) -> str | None:
    """Where the nunchaku_lite targets and the tensors disagree, or None."""
    for section, kind in (("svdq_w4a4", "svdq"), ("awq_w4a16", "awq")):
        targets = set((lite.get(section) or {}).get("targets") or ())
        found = {layer for layer, f in formats.items() if f.kind == kind}
        if targets != found:
            odd = sorted(targets - found) or sorted(found - targets)
            side = "has no such tensors" if odd[0] in targets else "is not among its targets"
            return f"quantization_config {section}: layer {odd[0]} {side} ({len(targets)} targets, {len(found)} layers)"
    return None


def _layers(source, model_class: str, model_config: dict,
            lite: bool = False) -> tuple[dict[str, LayerFormat], set[str], list[str]]:
    """SVDQ and AWQ layers, the precisions their scales show, and anything malformed."""
    tensors = source.tensors
    formats, precisions, problems = {}, set(), []
    for name, info in tensors.items():
        if not name.endswith(".qweight"):
            continue
        layer = name[: -len(".qweight")]
        if f"{layer}.wzeros" in tensors:
            formats[layer] = LayerFormat("awq")
            continue
        down, scales = tensors.get(f"{layer}.proj_down"), tensors.get(f"{layer}.wscales")
        if down is None or scales is None or f"{layer}.smooth_factor" not in tensors:
            problems.append(f"{layer} has qweight but not wscales, smooth_factor and proj_down")
            continue
        precision = "nvfp4" if scales.dtype == torch.float8_e4m3fn else "int4"
        precisions.add(precision)
        k = 2 * info.shape[1]
        if scales.shape[1] * GROUP[precision] != k:
            problems.append(f"{layer}.wscales {tuple(scales.shape)} is not one {precision} scale per "
                            f"{GROUP[precision]} of its {k} inputs")
        unsigned = precision == "int4" and not lite
        if model_class == "FluxTransformer2DModel" and not lite and re.fullmatch(r"single_transformer_blocks\.\d+\.proj_out", layer):
            # nunchaku's two halves (attention | MLP), merged by the layout repack, each of rank r
            first = proj_out_split(model_config)
            parts = (Part(first, down.shape[0] // 2), Part(k - first, down.shape[0] // 2, unsigned))
        else:
            parts = (Part(k, down.shape[0], unsigned and unsigned_int4(model_class, layer)),)
        formats[layer] = LayerFormat("svdq", parts)
    return formats, precisions, problems


def detect(source, request) -> QuantClaim | None:
    flags = request if request is not None and getattr(request, "enable_svdquant", False) else None
    model_config = source.config
    model_class = model_config.get("_class_name", "")
    names = [Path(f).name for f in getattr(source, "files", [])]
    by_name = [m for m in (FILE_NAME.search(n) for n in names) if m]
    meta, meta_where = _metadata(source)
    declared = model_config.get("quantization_config")
    declared = declared if _is_svdquant_declaration(declared) else meta.get("quantization_config")
    declared = declared if _is_svdquant_declaration(declared) else None
    lite = lite_config(model_config.get("quantization_config"))
    formats, precisions, problems = _layers(source, model_class, model_config, lite=lite is not None)
    svdq = {k: v for k, v in formats.items() if v.kind == "svdq"}
    nunchaku_class = meta.get("model_class", "")
    if not (svdq or by_name or declared or lite or flags or str(nunchaku_class).startswith("Nunchaku")):
        return None

    evidence = []
    if by_name:
        evidence.append(f"file name {by_name[0].group(0)}")
    if declared:
        evidence.append(f"quantization_config method={declared.get('method', '?')} (no quant_method needed)")
    if lite:
        evidence.append(f"quantization_config quant_method=nunchaku_lite in {getattr(source, 'declared_in', 'config.json')} "
                        "(diffusers' loader for nunchaku's tensors)")
    evidence += [w for w in meta_where if not w.startswith("quantization_config")]
    if svdq:
        evidence.append(f"{len(svdq)} SVDQ W4A4 and {len(formats) - len(svdq)} AWQ W4A16 layers in the tensors")
    if flags:
        evidence.append("--enable-svdquant")
    said = "; ".join(evidence)

    # Each source's precision and rank, to be checked against each other.
    precision_of, rank_of = {}, {}
    if by_name:
        precision_of["file name"] = PRECISIONS[by_name[0].group(1)]
        rank_of["file name"] = int(by_name[0].group(2))
    if declared:
        dtype = str((declared.get("weight") or {}).get("dtype", "")).lower()
        if dtype:
            precision_of["metadata"] = PRECISIONS.get(dtype, dtype)
        if "rank" in declared:
            rank_of["metadata"] = int(declared["rank"])
    lite_svdq = (lite or {}).get("svdq_w4a4") or {}
    if "precision" in lite_svdq:
        precision_of["nunchaku_lite config"] = PRECISIONS.get(str(lite_svdq["precision"]).lower(), lite_svdq["precision"])
    if "rank" in lite_svdq:
        rank_of["nunchaku_lite config"] = int(lite_svdq["rank"])
    if precisions:
        precision_of["tensors"] = "/".join(sorted(precisions))
    ranks = Counter(p.rank for f in svdq.values() for p in f.parts)
    if ranks:
        rank_of["tensors"] = ranks.most_common(1)[0][0]
    if flags is not None and flags.precision:
        precision_of["--quantization-precision"] = PRECISIONS.get(flags.precision, flags.precision)
    if flags is not None and flags.rank:
        rank_of["--quantization-rank"] = int(flags.rank)

    precision = precision_of.get("tensors") or next(iter(precision_of.values()), "int4")
    rank = rank_of.get("tensors") or next(iter(rank_of.values()), 32)
    config = QuantConfig.make(
        FAMILY, scheme=precision,
        params={"precision": precision, "group": GROUP.get(precision), "rank": rank,
                "nunchaku_model_class": nunchaku_class or None,
                "awq_layers": sum(f.kind == "awq" for f in formats.values()), "svdq_layers": len(svdq)},
        layer_schemes={layer: f.encode() for layer, f in formats.items()},
        ignore=tuple(linears_stored_unquantized(source, ("qweight",))),
        provenance=said)

    unsupported = None
    meta_class = (meta.get("config") or {}).get("_class_name") if isinstance(meta.get("config"), dict) else None
    if not svdq:
        who = "--enable-svdquant" if flags else said
        unsupported = f"{who} says SVDQuant, but the checkpoint holds no SVDQuant tensors (qweight, wscales, proj_down)"
    elif problems:
        unsupported = "; ".join(problems[:3])
    elif lite and _lite_targets(lite, formats):
        unsupported = _lite_targets(lite, formats)
    elif len(set(precision_of.values())) > 1:
        unsupported = "precisions disagree: " + ", ".join(f"{k} {v}" for k, v in precision_of.items())
    elif len(set(rank_of.values())) > 1:
        unsupported = "ranks disagree: " + ", ".join(f"{k} {v}" for k, v in rank_of.items())
    elif meta_class and model_class and meta_class != model_class:
        unsupported = f"the file's metadata config is for {meta_class}, the model is {model_class}"
    elif nunchaku_class in NUNCHAKU_CLASSES and model_class and NUNCHAKU_CLASSES[nunchaku_class] != model_class:
        unsupported = f"model_class {nunchaku_class} is not a {model_class}"
    if unsupported and any(k.startswith("--") for k in (*precision_of, *rank_of)) and "disagree" in unsupported:
        unsupported = f"a flag contradicts the checkpoint: {unsupported}"
    specificity = 100 if flags else 30 if (declared or by_name or lite) else 25
    return QuantClaim(config, specificity, said, unsupported_reason=unsupported)
