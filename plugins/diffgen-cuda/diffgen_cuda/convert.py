"""``diffgen convert modelopt-fp8``: a loadable FP8 transformer from a ModelOpt diffusers export.

Inputs: the export (ModelOpt ``--hf-ckpt-dir``: config.json with a ``modelopt`` quantization_config,
safetensors), its ``backbone.pt`` (``mto.save``: ``model_state_dict`` holds each quantizer's
``_amax`` and the 16-bit weights) and the base BF16 transformer. Every weight of the export goes
through these steps, first match wins:

1. BF16 fallback (the family's preset, or ``--keep-bf16-pattern``): the module's tensors come from
   the base transformer, its scales are dropped. This runs BEFORE ModelOpt's ignore list is
   honoured: the other order once left an FP8 tensor behind a reported fallback (SGLang PR 23155).
2. ModelOpt's ``ignore`` globs: the module is kept as exported.
3. Both ``<module>.weight_quantizer._amax`` and ``.input_quantizer._amax`` in backbone.pt:
   ``weight_scale = w_amax / 448``, ``input_scale = a_amax / 448`` (fp32, 0-d) and
   ``weight = fp8(clamp(W / weight_scale))``, W being backbone.pt's 16-bit weight (else the
   export's, dequantized with its own scale).
4. Otherwise kept as exported; a 16-bit linear is added to ``ignore`` ("auto-ignored").

``*_quantizer.*`` tensors are dropped. The output (config.json with the updated ignore list,
sharded safetensors with an index) is written to a temporary directory, re-read and checked, then
renamed into place. This module never imports the generation pipeline.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from diffgen.checkpoint import UNQUANTIZED_DTYPES, CheckpointSource, open_checkpoint
from diffgen.checkpoint_writer import atomic_directory, check_manifest, finish_layout, refuse_existing, write_shards
from diffgen.errors import DiffgenError
from diffgen.hub import resolve_transformer, resolve_weights
from diffgen.numerics.fp8 import FP8_E4M3_MAX, dequantize_fp8, quantize_fp8
from diffgen.quant import matches_glob
from diffgen.tools.convert import Converter

from . import extras, modelopt

FP8 = torch.float8_e4m3fn
SHARD_BYTES = 5 << 30
# e4m3 rounding moves a normal value by at most 2^-4 of itself; subnormals by scale * 2^-10.
_REL_TOL = 2.0 ** -4

# BF16 fallback presets (regexes, fullmatch on module names): the layers whose FP8 error showed in
# images or videos when SGLang validated these families (build_modelopt_fp8_transformer).
PRESETS: dict[str, tuple[str, ...]] = {
    "flux1": (r"transformer_blocks\.\d+\.norm1\.linear", r"transformer_blocks\.\d+\.norm1_context\.linear",
              r"transformer_blocks\.\d+\.ff\.net\.0\.proj", r"transformer_blocks\.\d+\.ff\.net\.2",
              r"transformer_blocks\.\d+\.ff_context\.net\.0\.proj", r"transformer_blocks\.\d+\.ff_context\.net\.2",
              r"single_transformer_blocks\.\d+\.norm\.linear", r"single_transformer_blocks\.\d+\.proj_mlp"),
    "qwen-image": (r"img_in", r"txt_in", r"time_text_embed\.timestep_embedder\.linear_[12]", r"norm_out\.linear",
                   r"proj_out", r"transformer_blocks\.\d+\.img_mlp\.net\.2", r"transformer_blocks\.\d+\.img_mod",
                   r"transformer_blocks\.\d+\.txt_mod"),
    "hunyuan-video": (r"context_embedder\..*", r"x_embedder\.proj",
                      r"time_text_embed\.(timestep|guidance|text)_embedder\.linear_[12]", r"norm_out\.linear",
                      r"proj_out", r"transformer_blocks\.\d+\.norm1\.linear",
                      r"transformer_blocks\.\d+\.norm1_context\.linear",
                      r"single_transformer_blocks\.\d+\.norm\.linear"),
    "none": (),
}
MODEL_TYPES = {"FluxTransformer2DModel": "flux1", "QwenImageTransformer2DModel": "qwen-image",
               "HunyuanVideoTransformer3DModel": "hunyuan-video"}


def module_variants(module: str) -> list[str]:
    """The names a preset or ignore entry may use for a module: Qwen's modulation Linear is
    ``img_mod.1`` in diffusers and ``img_mod`` in the presets."""
    canonical = re.sub(r"\.(img_mod|txt_mod)\.1$", r".\1", module)
    return [module] if canonical == module else [module, canonical]


@dataclass
class Plan:
    """What happens to each module of the export."""

    fallback: set[str] = field(default_factory=set)
    ignored: set[str] = field(default_factory=set)
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # scales
    auto_ignored: set[str] = field(default_factory=set)
    missing_amax: set[str] = field(default_factory=set)  # FP8 in the export, no amax in backbone.pt


def _transformer_dir(path: str | Path, what: str) -> Path:
    path = resolve_transformer(path)  # a local folder, or a Hugging Face repo ID fetched into the cache
    for candidate in (path, path / "transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise DiffgenError(f"{what} {path} has no config.json (nor transformer/config.json); pass the "
                       "transformer directory")


def _load_backbone(path: str | Path) -> dict[str, torch.Tensor]:
    path = resolve_weights(path)
    path = path / "backbone.pt" if path.is_dir() else path
    if not path.is_file():
        raise DiffgenError(f"--modelopt-backbone-ckpt {path} does not exist (mto.save writes backbone.pt)")
    try:  # weights_only: a pickle can run code; ModelOpt's state is plain containers and tensors
        state = _torch_load_weights_only(path)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types; all mean "refused"
        raise DiffgenError(f"torch.load(weights_only=True) could not read {path}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not any(k.endswith("_quantizer._amax") for k in state):
        raise DiffgenError(f"{path} holds no '*_quantizer._amax' tensors; is it ModelOpt's mto.save output?")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _torch_load_weights_only(path: Path):
    """``torch.load(weights_only=True)``, memory-mapped when the file is a zip archive. A legacy
    (pre-1.6, non-zip) torch.save file cannot be mapped; it is read whole, through the same
    restricted unpickler, so a benign one loads and a malicious one is still refused."""
    import zipfile

    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _scales(backbone: dict[str, torch.Tensor], maxbound: float = FP8_E4M3_MAX) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (weight_scale, input_scale) for modules with both amaxes; per-tensor only."""
    out = {}
    for key, amax in backbone.items():
        if not key.endswith(".weight_quantizer._amax"):
            continue
        module = key[: -len(".weight_quantizer._amax")]
        act = backbone.get(f"{module}.input_quantizer._amax")
        if act is None:
            continue
        if amax.numel() != 1 or act.numel() != 1:
            raise DiffgenError(f"backbone.pt has a {tuple(amax.shape)} amax for {module}: this converter writes "
                               "per-tensor FP8 (quant_algo FP8); FP8_PER_CHANNEL_PER_TOKEN exports load "
                               "directly, without conversion")
        out[module] = ((amax.float() / maxbound).reshape(()), (act.float() / maxbound).reshape(()))
    return out


def plan_conversion(source: CheckpointSource, scales: dict, patterns: tuple[str, ...],
                    ignore: tuple[str, ...]) -> Plan:
    plan = Plan()
    for name, info in source.tensors.items():
        if not name.endswith(".weight") or "_quantizer." in name:
            continue
        module = name[: -len(".weight")]
        variants = module_variants(module)
        if any(re.fullmatch(p, v) for p in patterns for v in variants):
            plan.fallback.add(module)
        elif any(matches_glob(p, v) for p in ignore for v in variants):
            plan.ignored.add(module)
        elif module in scales and len(info.shape) == 2:
            plan.quantized[module] = scales[module]
        elif len(info.shape) == 2 and info.dtype != FP8:
            plan.auto_ignored.add(module)
        elif info.dtype == FP8:
            plan.missing_amax.add(module)
    return plan


def _reference_weight(name: str, source: CheckpointSource, backbone: dict) -> torch.Tensor:
    """The 16-bit weight ModelOpt calibrated: backbone.pt's, else the export's (dequantized)."""
    w = backbone.get(name)
    if w is not None and w.dtype in UNQUANTIZED_DTYPES and tuple(w.shape) == tuple(source.info(name).shape):
        return w.float()
    w = source.read(name)
    if w.dtype == FP8:
        return dequantize_fp8(w, source.read(name[: -len(".weight")] + ".weight_scale"))
    return w.float()


def converted_tensors(source: CheckpointSource, base: CheckpointSource, backbone: dict, plan: Plan,
                      stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The output stream, shard by shard of the export."""
    for module in sorted(plan.fallback):  # every base tensor of a fallback module, first
        names = [n for n in base.tensors if n.rpartition(".")[0] == module]
        if f"{module}.weight" not in names:
            raise DiffgenError(f"BF16 fallback {module!r}: the base transformer {base.describe()} has no "
                               f"{module}.weight; is it the model this export was made from?")
        for n in names:
            yield n, base.read(n)
        stats["fallback"] += 1
    for name, tensor in source.iter_tensors():
        module, _, leaf = name.rpartition(".")
        if "_quantizer." in name:
            stats["removed_quantizer_tensors"] += 1
        elif module in plan.fallback:
            continue
        elif module in plan.quantized:
            if leaf == "weight":
                weight_scale, input_scale = plan.quantized[module]
                w = _reference_weight(name, source, backbone)
                yield name, quantize_fp8(w, weight_scale)
                yield f"{module}.weight_scale", weight_scale
                yield f"{module}.input_scale", input_scale
                stats["quantized"] += 1
                stats["scale_tensors"] += 2
            elif leaf not in ("weight_scale", "input_scale"):  # bias; the export's scales are replaced
                yield name, tensor
        else:
            if leaf == "weight" and module in plan.ignored:
                stats["preserved_ignored"] += 1
            yield name, tensor


def output_quantization_config(source: CheckpointSource, plan: Plan) -> dict:
    qc = dict(source.config.get("quantization_config") or {})
    decl = modelopt.read_declaration(source)
    qc.setdefault("quant_method", "modelopt")
    qc["quant_algo"] = "FP8"
    qc["ignore"] = sorted({*decl.ignore, *plan.fallback, *plan.auto_ignored})
    qc.pop("quantization", None)  # a nested copy would repeat the old exclude_modules
    return qc


def verify(out: Path, manifest: dict, source: CheckpointSource, base: CheckpointSource, backbone: dict,
           plan: Plan) -> None:
    """Re-read what was written: detected as ModelOpt FP8, tensors as written, FP8 weights within
    rounding of the 16-bit weights, fallbacks equal to the base, no 16-bit linear outside ignore."""
    written = open_checkpoint(out)
    claim = modelopt.detect(written)
    if claim is None or claim.unsupported_reason or claim.config.family != "fp8" or claim.specificity < 30:
        raise DiffgenError(f"verification failed: {out} is not detected as a ModelOpt FP8 checkpoint")
    check_manifest(written, manifest)
    ignore = written.config["quantization_config"]["ignore"]
    for name, info in written.tensors.items():
        module, _, leaf = name.rpartition(".")
        if "_quantizer." in name:
            raise DiffgenError(f"verification failed: {name} (a ModelOpt quantizer buffer) was written")
        if leaf != "weight":
            continue
        if module in plan.fallback:
            if not torch.equal(written.read(name), base.read(name)):
                raise DiffgenError(f"verification failed: fallback {name} differs from the base transformer's")
        elif info.dtype == FP8 and module in plan.quantized:
            scale = written.read(f"{module}.weight_scale")
            ref = _reference_weight(name, source, backbone)
            err = (dequantize_fp8(written.read(name), scale) - ref).abs()
            if not bool((err <= _REL_TOL * ref.abs() + scale * 2.0 ** -9).all()):
                raise DiffgenError(f"verification failed: {name} differs from its 16-bit weight by more than "
                                   "FP8 rounding allows")
        elif len(info.shape) == 2 and info.dtype != FP8 and not any(
                matches_glob(p, v) for p in ignore for v in module_variants(module)):
            raise DiffgenError(f"verification failed: 16-bit linear {module} is not in the written ignore list")


def convert(modelopt_hf_dir, modelopt_backbone_ckpt, base_transformer_dir, output_dir, *,
            model_type: str = "auto", keep_bf16_patterns: tuple[str, ...] = (), overwrite: bool = False) -> dict:
    """Build the FP8 transformer at ``output_dir``; returns the statistics that ``main`` prints."""
    refuse_existing(Path(output_dir), overwrite)
    for pattern in keep_bf16_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise DiffgenError(f"--keep-bf16-pattern {pattern!r} is not a regular expression: {exc}") from exc
    source = open_checkpoint(_transformer_dir(modelopt_hf_dir, "--modelopt-hf-dir"))
    decl = modelopt.read_declaration(source)
    if decl is None or decl.algo not in ("FP8", ""):
        found = f"quant_algo {decl.algo}" if decl else "no ModelOpt quantization_config"
        direct = "; FP8_PER_CHANNEL_PER_TOKEN exports load directly" if decl and decl.algo in modelopt.SUPPORTED else ""
        raise DiffgenError(f"diffgen convert modelopt-fp8 converts ModelOpt FP8 exports (quant_method modelopt, "
                           f"quant_algo FP8); this one has {found}{direct} ({source.describe()})")
    with_extras = next((n for n in source.tensors if n.endswith((f".{extras.SMOOTHING}", f".{extras.LORA_A}"))), None)
    if with_extras is not None:
        raise DiffgenError(f"{with_extras} ({source.describe()}): this FP8 export carries smoothing or SVDQuant "
                           "low-rank branches (--quant-algo svdquant), which re-quantizing the 16-bit weights would "
                           "lose; it loads as it is, without converting")
    base = open_checkpoint(_transformer_dir(base_transformer_dir, "--base-transformer-dir"))
    backbone = _load_backbone(modelopt_backbone_ckpt)
    class_name = source.config.get("_class_name")
    resolved = MODEL_TYPES.get(class_name, "none") if model_type == "auto" else model_type
    if resolved not in PRESETS:
        raise DiffgenError(f"--model-type {model_type!r}: choose auto, {', '.join(PRESETS)}")
    if model_type not in ("auto", "none") and MODEL_TYPES.get(class_name, model_type) != model_type:
        raise DiffgenError(f"--model-type {model_type}: this export is a {class_name}, whose preset is "
                           f"{MODEL_TYPES[class_name]}; use --model-type auto")
    patterns = PRESETS[resolved] + tuple(keep_bf16_patterns)
    plan = plan_conversion(source, _scales(backbone), patterns, decl.ignore)
    if model_type not in ("auto", "none") and PRESETS[resolved] and not plan.fallback:
        raise DiffgenError(f"--model-type {model_type}: its BF16 fallback preset matches no module of this "
                           f"{class_name} export; use --model-type auto")
    if plan.missing_amax or not plan.quantized:
        missing = sorted(plan.missing_amax)
        what = (f"for {len(missing)} layers the export quantized (e.g. {', '.join(missing[:3])})" if missing
                else "for any linear of the export")
        raise DiffgenError(f"{modelopt_backbone_ckpt} has no weight and input amax {what}; is it the backbone.pt "
                           "saved with this export?")
    stats = {"output": str(output_dir), "model_type": resolved, "quantized": 0, "fallback": 0,
             "preserved_ignored": 0, "auto_ignored": len(plan.auto_ignored), "scale_tensors": 0,
             "removed_quantizer_tensors": 0, "shards": 0}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        manifest, files = write_shards(converted_tensors(source, base, backbone, plan, stats), tmp,
                                       shard_bytes=SHARD_BYTES)
        stats["shards"] = len(finish_layout(tmp, manifest, files, always_index=True))
        config = {**source.config, "quantization_config": output_quantization_config(source, plan)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        verify(tmp, manifest, source, base, backbone, plan)
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffgen convert modelopt-fp8", allow_abbrev=False,
                                description="Build a loadable ModelOpt FP8 transformer from a ModelOpt diffusers "
                                            "export, its backbone.pt and the base BF16 transformer.")
    p.add_argument("--modelopt-hf-dir", required=True, help="ModelOpt --hf-ckpt-dir output, or its transformer/")
    p.add_argument("--modelopt-backbone-ckpt", required=True, help="ModelOpt's backbone.pt (mto.save), or its folder")
    p.add_argument("--base-transformer-dir", required=True, help="the 16-bit transformer the export was made from")
    p.add_argument("--output-dir", required=True, help="written atomically; refused if it exists without --overwrite")
    p.add_argument("--model-type", default="auto", choices=["auto", *PRESETS],
                   help="BF16 fallback preset (default: from config.json _class_name)")
    p.add_argument("--keep-bf16-pattern", action="append", default=[], metavar="REGEX",
                   help="also keep modules matching REGEX (fullmatch on the module name) in BF16")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stats = convert(args.modelopt_hf_dir, args.modelopt_backbone_ckpt, args.base_transformer_dir, args.output_dir,
                    model_type=args.model_type, keep_bf16_patterns=tuple(args.keep_bf16_pattern),
                    overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0


CONVERTER = Converter(summary="a loadable FP8 transformer from a ModelOpt diffusers export, its backbone.pt and "
                              "the base BF16 transformer, with per-family BF16 fallbacks", main=main)


if __name__ == "__main__":
    CONVERTER.run_as_script("diffgen convert modelopt-fp8")
