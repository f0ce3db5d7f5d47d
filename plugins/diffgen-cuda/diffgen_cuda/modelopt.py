"""ModelOpt FP8 checkpoints: NVIDIA Model Optimizer's HF export (``quant_method: "modelopt"``).

Tensors per quantized linear (``export_hf_checkpoint``; scale = amax / 448, a dequant multiplier):
  weight        float8_e4m3fn [N, K]
  weight_scale  fp32 () per tensor; [S], one per shard, on a fused layer (SGLang's merged QKV);
                [N] with quant_algo FP8_PER_CHANNEL_PER_TOKEN
  input_scale   fp32 () static, calibrated (FP8 only)
Forward: y = (q(x * (1 / input_scale)) * input_scale) @ (W_fp8 * weight_scale)^T + b. That is the builtin
``fp8`` family (per-tensor weights, static activations; FP8_PER_CHANNEL_PER_TOKEN = per-channel
weights, dynamic per-token activations), so this module only detects: the builtin fp8 methods, or
a faster plugin's methods for that family, run the layers. A per-shard ``[S]`` weight_scale makes
its layer per-channel: ``fit_scales`` repeats each shard's scale over the shard's rows and keeps
the FP8 bytes (exact, as vLLM's CUTLASS path does; requantizing to the largest scale would round
twice). A per-shard input_scale becomes its maximum, as in vLLM and SGLang.

Declarations: config.json ``quantization_config`` (flat: ``quant_algo``, ``ignore``,
``config_groups``), or the nested ``hf_quant_config.json`` (``quantization.quant_algo``,
``quantization.exclude_modules``). Ignore entries are globs on the full module name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from diffgen.builtin.fp8 import SCALE_SUFFIXES
from diffgen.checkpoint import linears_stored_unquantized
from diffgen.errors import LoadError
from diffgen.quant import QuantClaim, QuantConfig, RepackTarget, TensorStream, matches_glob

from . import comfy, extras, modelopt_fp8, modelopt_int8, nvfp4, sglang_names

FP8 = torch.float8_e4m3fn
# quant_algo -> (fp8 scheme, activation scheme)
SUPPORTED = {"FP8": ("per-tensor", "static"), "FP8_PER_CHANNEL_PER_TOKEN": ("per-channel", "dynamic")}
# quant_algo -> modelopt_int8 scheme: W8A16 is INT8_WEIGHT_ONLY_CFG's export (no input_scale)
INT8_ALGOS = {"W8A8_SQ_PER_CHANNEL": "w8a8", "W8A16": "w8a16"}
NVFP4_ALGOS = {"NVFP4", "FP4", "W4A16_NVFP4", "NVFP4_AWQ", "NVFP4_SVD", "W4A8_NVFP4_FP8", "NVFP4_STATIC"}
# quant_algo -> nvfp4 scheme, for the algorithms whose tensors are NVFP4's (nvfp4.py); AWQ and SVD
# add smoothing and a low-rank branch per layer, which the tensors show
NVFP4_SCHEMES = {"NVFP4": "w4a4", "NVFP4_STATIC": "w4a4", "W4A16_NVFP4": "w4a16", "NVFP4_AWQ": "w4a4",
                 "NVFP4_SVD": "w4a4"}
# QuantConfig param that marks an fp8 config as read from a ModelOpt export (its scales may come one
# per fused shard, which repack_checkpoint spreads to the planned layout).
CHECKPOINT_FORMAT = "modelopt"


@dataclass(frozen=True)
class Declaration:
    """What the checkpoint says about itself."""

    algo: str
    ignore: tuple[str, ...]
    where: str  # the file and keys, for the evidence
    mixed_algos: tuple[str, ...] = ()  # MIXED_PRECISION: the per-layer algorithms
    problem: str | None = None  # what in the declaration cannot be right (its key and value)


def _algo_from_groups(qc: dict) -> str:
    """An export without quant_algo: tell FP8 from NVFP4 by the weights' bit width."""
    groups = qc.get("config_groups")
    for group in (groups.values() if isinstance(groups, dict) else ()):
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            continue
        if weights.get("type") == "float" and weights.get("num_bits") == 8:
            return "FP8"
        if weights.get("type") == "float" and weights.get("num_bits") == 4:
            return "NVFP4"
    return ""


def _names_problem(**lists) -> str | None:
    """``key=value`` of the first ignore list that is not a list of module-name strings."""
    for key, value in lists.items():
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return f"{key}={value!r} is not a list of module names"
    return None


def _mixed_algos(layers) -> tuple[str, ...]:
    if not isinstance(layers, dict):
        return ()
    algos = {str(v.get("quant_algo", "?")).upper() for v in layers.values() if isinstance(v, dict)}
    return tuple(sorted(algos))


def read_declaration(source) -> Declaration | None:
    """The ModelOpt declaration of a checkpoint, from config.json or hf_quant_config.json."""
    qc = source.config.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() in ("modelopt", "modelopt_fp8", "modelopt_fp4"):
        method = str(qc["quant_method"]).lower()
        nested = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else {}
        algo = str(qc.get("quant_algo") or nested.get("quant_algo") or "").upper()
        algo = algo or {"modelopt_fp8": "FP8", "modelopt_fp4": "NVFP4"}.get(method) or _algo_from_groups(qc)
        problem = _names_problem(ignore=qc.get("ignore"), exclude_modules=nested.get("exclude_modules"))
        ignore = [] if problem else list(qc.get("ignore") or []) + list(nested.get("exclude_modules") or [])
        layers = qc.get("quantized_layers") or nested.get("quantized_layers") or {}
        where = getattr(source, "declared_in", "config.json")
        return Declaration(algo, tuple(ignore), f"quantization_config in {where} (quant_method={method}, "
                           f"quant_algo={algo or '?'})", _mixed_algos(layers), problem)
    sidecar = source.sidecars.get("hf_quant_config.json")
    if isinstance(sidecar, dict) and isinstance(sidecar.get("quantization"), dict):
        q = sidecar["quantization"]
        algo = str(q.get("quant_algo") or "").upper()
        problem = _names_problem(exclude_modules=q.get("exclude_modules"))
        return Declaration(algo, () if problem else tuple(q.get("exclude_modules") or []),
                           f"hf_quant_config.json (quantization.quant_algo={algo or '?'})",
                           _mixed_algos(q.get("quantized_layers") or {}), problem)
    return None


def _unsupported(decl: Declaration) -> str:
    supported = ("diffgen-cuda loads ModelOpt quant_algo FP8 (also with SVDQuant's extras), FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, "
                 "NVFP4, W4A16_NVFP4, "
                 "NVFP4_AWQ, NVFP4_SVD, W8A8_SQ_PER_CHANNEL and W8A16 (INT8)")
    if decl.algo == "MIXED_PRECISION":
        per_layer = f" (per-layer algorithms: {', '.join(decl.mixed_algos)})" if decl.mixed_algos else ""
        return (f"ModelOpt MIXED_PRECISION{per_layer} is not supported; {supported}. Export the model "
                "with a single quant_algo")
    if decl.algo in NVFP4_ALGOS:
        extra = {"W4A8_NVFP4_FP8": "its FP8-range block scales"}.get(decl.algo, "it")
        return f"ModelOpt {decl.algo} (NVFP4 family) is not supported yet: diffgen-cuda does not apply {extra}; {supported}"
    if not decl.algo:
        return f"the declaration names no quant_algo and its config_groups do not say FP8; {supported}"
    return f"ModelOpt quant_algo {decl.algo} is not supported; {supported}"


def _fp8_layers(source) -> dict[str, str]:
    """Layers the tensors show as FP8: name -> 'per-tensor' / 'per-shard' / 'per-channel'."""
    names = source.tensors
    out = {}
    for name, info in names.items():
        if name.endswith(".weight") and info.dtype == FP8:
            prefix = name[: -len(".weight")]
            scale = names.get(f"{prefix}.weight_scale")
            if scale is not None:
                rows = info.shape[0] if info.shape else 0
                out[prefix] = ("per-tensor" if scale.numel == 1 else
                               "per-channel" if scale.numel == rows else "per-shard")
    return out


def _ignore_list(decl: Declaration | None, source, quantized=()) -> tuple[str, ...]:
    """ModelOpt's globs, their diffusers names where SGLang wrote runtime names, and every linear
    the checkpoint stores in 16-bit (``proj_out`` as a glob is only exact). A glob that matches a
    layer the tensors show ``quantized`` is dropped: the tensors win over a stale list."""
    model_class = source.config.get("_class_name")
    ignore = list(decl.ignore if decl else ()) + linears_stored_unquantized(source, SCALE_SUFFIXES)
    for entry in list(ignore):
        ignore += sglang_names.diffusers_module_names(model_class, entry)
    return tuple(e for e in dict.fromkeys(ignore) if not any(matches_glob(e, layer) for layer in quantized))


def _nvfp4_claim(decl: Declaration | None, source) -> QuantClaim | None:
    """NVFP4 from a declaration, or from the tensors alone (uint8 weight, e4m3 weight_scale with
    one column per 16 elements, weight_scale_2)."""
    layers = nvfp4.nvfp4_layers(source)
    if decl is None and not layers:
        return None
    scheme = NVFP4_SCHEMES[decl.algo] if decl else ("w4a4" if "w4a4" in layers.values() else "w4a16")
    where = decl.where if decl else "no quantization declared"
    evidence = where
    if layers:
        static = sum(kind == "w4a4" for kind in layers.values())
        evidence += (f"; {len(layers)} NVFP4 weights (uint8, e4m3 weight_scale per 16, weight_scale_2), "
                     f"{static} with input_scale")
    groups = sorted({kind for kind in layers.values() if kind.startswith("group")})
    unsupported = f"block scales cover {', '.join(g.split()[1] for g in groups)} elements, not 16" if groups else None
    layer_schemes = {p: kind for p, kind in layers.items() if kind == "w4a4-dynamic" and scheme == "w4a4"}
    if layer_schemes:
        evidence += f"; {len(layer_schemes)} without input_scale quantize activations with a per-call global scale"
    ranks, smoothed, broken = extras.layer_extras(source, layers)
    unsupported = unsupported or broken
    if decl is not None and decl.algo == "NVFP4_SVD" and layers and not ranks and not unsupported:
        unsupported = (f"{decl.where} declares NVFP4_SVD, but no layer has {extras.LORA_A} / {extras.LORA_B}: "
                       "without its low-rank branch the model would compute something else")
    qc = source.config.get("quantization_config") if decl else None
    params, said = extras.params(ranks, smoothed)
    params["checkpoint_format"] = CHECKPOINT_FORMAT
    evidence += said
    if isinstance(qc, dict) and qc.get("swap_weight_nibbles"):
        params["swap_weight_nibbles"] = True
        evidence += "; nibbles packed high-first (swap_weight_nibbles)"
    declared_layout = qc.get("checkpoint_weight_scale_layout") if isinstance(qc, dict) else None
    if declared_layout == "swizzled":
        params["weight_scale_layout"] = "swizzled"
        evidence += "; block scales 128x4-tiled"
    own = _written_by_modelopt(source)
    if own and layers:
        tiled, problem = _swizzled_by_modelopt(source, layers, declared_layout)
        unsupported = unsupported or problem
        if tiled:
            params["weight_scale_layout"] = "swizzled"
            evidence += f"; block scales 128x4-tiled, as ModelOpt's enable_swizzle_layout writes them ({tiled})"
    config = QuantConfig.make(nvfp4.FAMILY, scheme=scheme, params=params,
                              layer_schemes=layer_schemes, ignore=_ignore_list(decl, source, layers),
                              provenance=f"ModelOpt {where}" if decl else "the tensors (no quantization declared)")
    specificity = (30 if layers else 20) if decl else 25
    claim = QuantClaim(config, specificity, evidence, unsupported_reason=unsupported)
    if own:  # ModelOpt packs the low nibble first, whatever header it wrote for ComfyUI
        return claim
    return comfy.with_comfy_layout(claim, source, qc, getattr(source, "declared_in", "config.json"))


def _int8_claim(decl: Declaration, source) -> QuantClaim:
    """ModelOpt INT8 (W8A8_SQ_PER_CHANNEL, or weight-only W8A16) from its declaration: int8 weights
    with per-row scales, static per-tensor int8 activations (W8A8), SmoothQuant's smoothing or
    SVDQuant's extras where exported."""
    layers = modelopt_int8.int8_layers(source)
    evidence = decl.where
    if layers:
        static = sum(kind == "w8a8" for kind in layers.values())
        evidence += f"; {len(layers)} int8 weights with per-row weight_scale, {static} with input_scale"
    ranks, smoothed, broken = extras.layer_extras(source, layers)
    params, said = extras.params(ranks, smoothed)  # no checkpoint_format: FP8's per-shard scales are not INT8's
    scheme = INT8_ALGOS[decl.algo]
    layer_schemes = {p: kind for p, kind in layers.items() if kind != scheme}
    if layer_schemes:
        evidence += (f"; {len(layer_schemes)} without input_scale keep 16-bit activations" if scheme == "w8a8" else
                     f"; {len(layer_schemes)} with an input_scale quantize their activations")
    unsupported = broken  # --quant-algo svdquant writes smoothing and a branch on INT8 layers too
    if not layers and not unsupported:
        unsupported = f"{decl.where} declares INT8, but no layer has an int8 weight with a per-row float32 weight_scale"
    config = QuantConfig.make(modelopt_int8.FAMILY, scheme=scheme, params=params, layer_schemes=layer_schemes,
                              ignore=_ignore_list(decl, source, layers), provenance=f"ModelOpt {decl.where}")
    return QuantClaim(config, 30 if layers else 20, evidence + said, unsupported_reason=unsupported)


def _fp8_block_weight_only_claim(decl: Declaration, source) -> QuantClaim:
    """ModelOpt FP8_PB_WO (``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG``): FP8 weights with a scale per
    128x128 block, 16-bit activations (``modelopt_fp8``)."""
    layers, wrong = list(_fp8_layers(source)), None
    for prefix in layers:
        weight, scale = source.tensors[f"{prefix}.weight"], source.tensors[f"{prefix}.weight_scale"]
        rows, cols = modelopt_fp8.block_scale_shape(*weight.shape)
        if scale.numel != rows * cols:
            wrong = wrong or (f"{prefix}.weight_scale (in {scale.file.name}) has {scale.numel} scales; a "
                              f"{list(weight.shape)} weight in 128x128 blocks has {rows} x {cols}")
        if f"{prefix}.input_scale" in source.tensors:
            wrong = wrong or f"{prefix}.input_scale is stored, but FP8_PB_WO leaves the activations 16-bit"
    if not layers:
        wrong = wrong or f"{decl.where} declares FP8_PB_WO, but no layer has a float8_e4m3fn weight with a weight_scale"
    config = QuantConfig.make(modelopt_fp8.BLOCK_WO_FAMILY, scheme="w8a16",
                              params={"checkpoint_format": CHECKPOINT_FORMAT}, ignore=_ignore_list(decl, source),
                              provenance=f"ModelOpt {decl.where}")
    evidence = f"{decl.where}; {len(layers)} float8_e4m3fn weights with a weight_scale per 128x128 block"
    return QuantClaim(config, 30 if layers else 20, evidence, unsupported_reason=wrong)


def _written_by_modelopt(source) -> bool:
    """The declaration names ModelOpt as its producer (config.json, the safetensors metadata or
    hf_quant_config.json): the tensors are then in ModelOpt's own layout."""
    qc = source.config.get("quantization_config")
    sidecar = source.sidecars.get("hf_quant_config.json")
    return any(isinstance(d, dict) and isinstance(d.get("producer"), dict) and d["producer"].get("name") == "modelopt"
               for d in (qc, sidecar))


def _swizzled_by_modelopt(source, layers, declared: str | None) -> tuple[str | None, str | None]:
    """(the evidence that ModelOpt's export tiled the block scales, or None; what contradicts the
    declared layout or leaves it unknown, or None)."""
    layout, seen = nvfp4.scale_layout(comfy.markers.raw_source(source), layers)
    if declared is None and layout == "swizzled":
        return seen, None
    if declared is not None and layout is not None and declared != layout:
        return None, f"quantization_config says checkpoint_weight_scale_layout={declared!r}, but {seen}"
    header = _layerwise_header(source)
    if declared is None and layout is None and header:
        return None, (f"ModelOpt exported this file for single-file runtimes ({header}), whose enable_swizzle_layout "
                      "option stores the NVFP4 block scales in 128x4 tiles, and at these layers' shapes tiled and "
                      "row-major scales look alike. Say which: add \"checkpoint_weight_scale_layout\": \"swizzled\" "
                      "(or \"linear\") to quantization_config in config.json")
    return None, None


def _layerwise_header(source) -> str | None:
    """Where ModelOpt wrote its per-layer header for single-file runtimes
    (``enable_layerwise_quant_metadata``), or None."""
    raw = comfy.markers.raw_source(source)
    for path, metadata in (getattr(raw, "metadata", None) or {}).items():
        if comfy.markers.METADATA_KEY in (metadata or {}) and comfy.markers.declared_producer(metadata) == "modelopt":
            return f"__metadata__[{comfy.markers.METADATA_KEY!r}] in {path}"
    return None


def _saved_by_diffusers(source) -> str | None:
    """Evidence that this is diffusers' ``NVIDIAModelOptConfig`` save (``save_pretrained``: 16-bit
    weights, ``*_quantizer._amax`` buffers and ``modelopt_state.pth``), not ModelOpt's HF export."""
    qc = source.config.get("quantization_config")
    if source.root is not None and (source.root / "modelopt_state.pth").is_file():
        return f"modelopt_state.pth in {source.root}"
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "modelopt" and "quant_type" in qc \
            and not qc.get("quant_algo"):
        return f"config.json quantization_config has diffusers' quant_type={qc['quant_type']!r}"
    return None


def detect(source) -> QuantClaim | None:
    broken = comfy.markers.problem_claim(source)  # the builtin fp8 plugin makes the same claim: no tie
    if broken is not None:
        return broken
    saved = _saved_by_diffusers(source)
    if saved:
        reason = ("this is a model saved by diffusers' ModelOpt quantizer (save_pretrained: 16-bit weights with "
                  "ModelOpt's quantizer state), which diffgen does not load; export the quantized pipeline with "
                  "ModelOpt's HF export instead: modelopt.torch.export.export_hf_checkpoint(pipe, export_dir=DIR) "
                  "after mtq.quantize and calibration, then load DIR/transformer")
        return QuantClaim(QuantConfig.make("modelopt", provenance=saved), 40, saved, unsupported_reason=reason)
    decl = read_declaration(source)
    if decl is None:
        return None if source.config.get("quantization_config") else _nvfp4_claim(None, source)
    if decl.problem:
        config = QuantConfig.make("modelopt", scheme=decl.algo or None, provenance=f"ModelOpt {decl.where}")
        return QuantClaim(config, 30, decl.where, unsupported_reason=f"the declaration is inconsistent: {decl.problem}")
    if decl.algo in NVFP4_SCHEMES:
        return _nvfp4_claim(decl, source)
    if decl.algo in INT8_ALGOS:
        return _int8_claim(decl, source)
    if decl.algo == "FP8_PB_WO":
        return _fp8_block_weight_only_claim(decl, source)
    if decl.algo not in SUPPORTED:
        config = QuantConfig.make("modelopt", scheme=decl.algo or None, provenance=f"ModelOpt {decl.where}")
        return QuantClaim(config, 20, decl.where, unsupported_reason=_unsupported(decl))
    scheme, activation = SUPPORTED[decl.algo]
    layers = _fp8_layers(source)
    with_input_scale = sum(f"{p}.input_scale" in source.tensors for p in layers)
    evidence = decl.where
    if activation == "static" and layers and not with_input_scale:
        activation = "dynamic"  # input quantizers were disabled: weight scales only
        evidence += "; no input_scale in the tensors, so activations are quantized per token"
    layer_schemes = {p: "per-channel" for p, kind in layers.items() if kind != "per-tensor" and scheme == "per-tensor"}
    # --quant-algo svdquant (or a smoothing) with --format fp8: the FP8 GEMM with extras around it
    ranks, smoothed, broken = extras.layer_extras(source, layers)
    params, said = extras.params(ranks, smoothed)
    params.update({"activation_scheme": activation, "checkpoint_format": CHECKPOINT_FORMAT})
    config = QuantConfig.make(modelopt_fp8.FAMILY if params.keys() & {"smoothed", "lowrank"} else "fp8",
                              scheme=scheme, params=params, layer_schemes=layer_schemes,
                              ignore=_ignore_list(decl, source), provenance=f"ModelOpt {decl.where}")
    if layers:
        evidence += f"; {len(layers)} float8_e4m3fn weights with weight_scale ({with_input_scale} with input_scale)"
        if layer_schemes:
            evidence += f", {len(layer_schemes)} with one scale per fused shard (loaded per-channel)"
        channels = _per_channel_input_scales(source, layers)
        if channels:
            evidence += (f"; {channels} with one input_scale per input channel, which ModelOpt's smoothquant leaves "
                         "on FP8 layers: activations quantized with their maximum, one scale (coarser than the "
                         "producer's fake quantization)")
    return QuantClaim(config, 30 if layers else 20, evidence + said, unsupported_reason=broken)


def _per_channel_input_scales(source, layers) -> int:
    """How many ``layers`` store one input_scale per input channel: ModelOpt's smoothquant skips FP8
    layers but leaves their input quantizers per channel (``fit_scales`` keeps the maximum)."""
    def per_channel(prefix):
        scale = source.tensors.get(f"{prefix}.input_scale")
        return scale is not None and len(scale.shape) == 1 and scale.shape[0] == source.tensors[f"{prefix}.weight"].shape[1] > 3

    return sum(map(per_channel, layers))


def fit_scales(tensors: TensorStream, target: RepackTarget) -> TensorStream:
    """Per-shard scales into the planned layout: weight_scale [S] -> [N] (each shard's scale over
    its rows), input_scale [S] -> its maximum (one activation feeds every shard); FP8_PB_WO's block
    scales to [N/128, K/128]."""

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            want = target.expected.get(name)
            if want is not None and tensor.numel() == 0 and _numel(want[0]):
                raise LoadError(f"{name} is empty (shape {tuple(tensor.shape)}); the layer needs {_numel(want[0])} "
                                "scales")
            if want is not None and name.endswith(".weight_scale") and _block_layout(tensor, want[0]):
                yield name, tensor.reshape(want[0])
                continue
            if want is None or tensor.numel() == _numel(want[0]) or not name.endswith(("weight_scale", "input_scale")):
                yield name, tensor
                continue
            if name.endswith(".input_scale") and _numel(want[0]) == 1:
                yield name, tensor.float().max().reshape(want[0])
                continue
            rows = _numel(want[0])
            if name.endswith(".weight_scale") and len(want[0]) == 1 and rows % tensor.numel() == 0:
                yield name, tensor.float().reshape(-1).repeat_interleave(rows // tensor.numel())
                continue
            raise LoadError(f"{name} has {tensor.numel()} scales, the layer needs {rows}: fused shards of "
                            "unequal widths cannot be told apart without the runtime's layout")

    return stream()


def _block_layout(tensor: torch.Tensor, want: tuple[int, ...]) -> bool:
    """FP8_PB_WO's block scales as ModelOpt stores them, [N/128, 1, K/128, 1] (a scalar for one
    block), against the planned [N/128, K/128]."""
    if len(want) != 2:
        return False
    return (tensor.dim() == 0 and want == (1, 1)) or (tensor.dim() == 4 and tensor.shape[1] == tensor.shape[3] == 1
                                                      and (tensor.shape[0], tensor.shape[2]) == tuple(want))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
