"""Builtin plugin: FP8 checkpoints (``quant_method: "fp8"``) and online ``--quantization fp8``.

The tensors and the forward are in ``fp8_methods`` (the reference and ``torch._scaled_mm``), the
checkpoint ``diffgen quantize`` writes in ``fp8_offline``. Detection reads the declared
``quantization_config`` (``activation_scheme``, ``weight_block_size``, ``ignored_layers`` /
``modules_to_not_convert``) and confirms the scheme with the scale tensors; linears the checkpoint
stores in 16-bit stay 16-bit. With no declaration anywhere, the tensors alone are enough, as
SGLang-Diffusion probes a weights file: float8_e4m3fn weights with ``weight_scale`` (ModelOpt's
and BFL's fp8r layout; a static ``input_scale`` when every layer has one) or
``weight_scale_inv`` (blocks), and e4m3fn weights with no scale at all (ComfyUI's plain FP8
casts), which load with a weight scale of one. Online quantization stores per-channel weight
scales (or the request's scheme) and quantizes activations per token.
"""

from __future__ import annotations

import torch

from ..checkpoint import linears_stored_unquantized
from ..hookspecs import hookimpl
from ..platform import Platform, PlatformReport
from ..quant import LayerSpec, QuantClaim, QuantConfig, RepackTarget
from . import comfy
from .fp8_methods import (SCHEMES, Fp8ReferenceMethod, Fp8ScaledMMMethod, scaled_mm_platform_reason,
                          scaled_mm_unavailable_reason)
from .fp8_offline import checkpoint_stream

FAMILY = "fp8"
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")
FP8 = torch.float8_e4m3fn


def _scale_scheme(source) -> str | None:
    for name, info in source.tensors.items():
        if name.endswith(".weight_scale_inv"):
            return "block"
        if name.endswith(".weight_scale"):
            return "per-tensor" if info.numel == 1 else "per-channel"
    return None


def _declaration_problem(source, qc: dict) -> str | None:
    """What in an fp8 declaration cannot be right, or None."""
    activation = str(qc.get("activation_scheme", "dynamic")).lower()
    if activation not in ("static", "dynamic"):
        return f"activation_scheme={qc.get('activation_scheme')!r}; expected 'static' or 'dynamic'"
    block = qc.get("weight_block_size")
    if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 65536 for b in block)):
        return f"weight_block_size={block!r}; expected two positive integers, e.g. [128, 128]"
    for key in ("ignored_layers", "modules_to_not_convert"):
        value = qc.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return f"{key}={value!r}; expected a list of module names"
    algo = qc.get("quant_algo")
    if algo is not None and "FP8" not in str(algo).upper():
        return f"quant_method fp8 contradicts quant_algo={algo!r}"
    if not any(info.dtype == FP8 for name, info in source.tensors.items() if name.endswith(".weight")):
        return "it declares fp8, but no weight in the checkpoint is float8_e4m3fn"
    return None


def _checkpoint_claim(source, qc: dict) -> QuantClaim:
    declared_in = getattr(source, "declared_in", "config.json")
    problem = _declaration_problem(source, qc)
    if problem:
        config = QuantConfig.make(FAMILY, provenance=f"quantization_config in {declared_in}")
        return QuantClaim(config, 30, f"quantization_config.quant_method=fp8 in {declared_in}",
                          unsupported_reason=f"the declaration is inconsistent: {problem}")
    block = qc.get("weight_block_size")
    scheme = "block" if block else _scale_scheme(source) or "per-tensor"
    activation = str(qc.get("activation_scheme", "dynamic")).lower()
    ignore = list(qc.get("ignored_layers") or []) + list(qc.get("modules_to_not_convert") or [])
    ignore += linears_stored_unquantized(source, SCALE_SUFFIXES)
    params = {"activation_scheme": activation}
    if block:
        params["block"] = tuple(block)
    confirmed = _scale_scheme(source) is not None
    config = QuantConfig.make(FAMILY, scheme=scheme, params=params, ignore=tuple(dict.fromkeys(ignore)),
                              provenance=f"quantization_config in {declared_in}")
    evidence = f"quantization_config.quant_method=fp8 in {declared_in}, activation_scheme={activation}"
    if confirmed:
        evidence += f"; {scheme} scales found in the tensors"
    return QuantClaim(config, 30 if confirmed else 10, evidence)


def _block_of(weight: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int] | None:
    """The square block size that gives ``scale``'s grid over ``weight``."""
    for size in (128, 64, 32, 256):
        if len(scale) == 2 and scale == (-(-weight[0] // size), -(-weight[1] // size)):
            return (size, size)
    return None


def _tensor_claim(source) -> QuantClaim | None:
    """FP8 recognised from the tensors alone, when nothing declares a quantization."""
    tensors = source.tensors
    layers: dict[str, str] = {}  # layer -> per-tensor / per-channel / block / unscaled
    blocks, with_input = set(), 0
    for name, info in tensors.items():
        if not (name.endswith(".weight") and info.dtype == FP8 and len(info.shape) == 2):
            continue
        prefix = name[: -len(".weight")]
        scale, block_scale = tensors.get(f"{prefix}.weight_scale"), tensors.get(f"{prefix}.weight_scale_inv")
        if block_scale is not None:
            blocks.add(_block_of(info.shape, block_scale.shape))
            layers[prefix] = "block"
        elif scale is None:
            layers[prefix] = "unscaled"
        else:
            layers[prefix] = ("per-tensor" if scale.numel == 1 else "per-channel" if scale.numel == info.shape[0]
                              else f"{scale.numel} scales for {info.shape[0]} rows")
        with_input += f"{prefix}.input_scale" in tensors
    if not layers:
        return None
    kinds = sorted(set(layers.values()))
    scaled = [p for p, k in layers.items() if k != "unscaled"]
    evidence = (f"no quantization declared; the tensors hold {len(layers)} float8_e4m3fn weights "
                f"({', '.join(f'{list(layers.values()).count(k)} {k}' for k in kinds)}), {with_input} with input_scale")
    unsupported = None
    if "block" in kinds and (len(kinds) > 1 or len(blocks) != 1 or None in blocks):
        unsupported = "block scales need one square block size for every layer; declare weight_block_size"
    elif any(" scales for " in k for k in kinds):
        unsupported = ("weight_scale has neither one value nor one per row (one per fused shard?); declare the "
                       "format (ModelOpt's hf_quant_config.json) so its plugin can lay the scales out")
    elif with_input and with_input != len(scaled):
        unsupported = "some FP8 layers carry an input_scale and others do not"
    static = bool(scaled) and with_input == len(scaled)
    scheme = "block" if "block" in kinds else "per-channel" if kinds == ["per-channel"] else "per-tensor"
    params = {"activation_scheme": "static" if static else "dynamic",
              "unit_scale_layers": tuple(p for p, k in layers.items() if k == "unscaled")}
    if scheme == "block" and unsupported is None:
        params["block"] = blocks.pop()
    layer_schemes = {p: "per-channel" for p, k in layers.items() if k == "per-channel" and scheme != "per-channel"}
    config = QuantConfig.make(FAMILY, scheme=scheme, params=params, layer_schemes=layer_schemes,
                              ignore=tuple(linears_stored_unquantized(source, SCALE_SUFFIXES)),
                              provenance="the tensors (no quantization declared)")
    return QuantClaim(config, 25, evidence, unsupported_reason=unsupported)


def online_config(ignored_layers: tuple[str, ...] = (), scheme: str = "per-channel") -> QuantConfig:
    return QuantConfig.make(FAMILY, scheme=scheme, params={"activation_scheme": "dynamic"},
                            user_ignore=tuple(ignored_layers), online=True,
                            provenance="--quantization fp8 (online)")


@hookimpl
def detect_quant_config(source, request):
    broken = comfy.problem_claim(source)  # ComfyUI markers that cannot be read or contradict their tensors
    if broken is not None:
        return broken
    qc = source.config.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == FAMILY:
        return _checkpoint_claim(source, qc)
    if qc is None:
        claim = _tensor_claim(source)
        if claim is not None:
            return claim
    if request is not None and request.method == FAMILY and not qc:
        scheme = request.scheme or SCHEMES[0]
        evidence = f"--quantization fp8 on a 16-bit checkpoint: {scheme} weights, per-token activations"
        unsupported = None if scheme in SCHEMES else f"fp8 schemes are {', '.join(SCHEMES)}, not {scheme!r}"
        return QuantClaim(online_config(request.ignored_layers, scheme), 100, evidence, unsupported_reason=unsupported)
    return None


@hookimpl
def create_linear_method(config: QuantConfig, layer: LayerSpec, platform: Platform):
    if config.family != FAMILY:
        return None
    return [Fp8ReferenceMethod(config, layer),
            Fp8ScaledMMMethod(config, layer, unavailable_reason=scaled_mm_unavailable_reason(config, layer, platform))]


@hookimpl
def check_platform(platform: Platform):
    reason = scaled_mm_platform_reason(platform)
    return (PlatformReport()
            .kernel("fp8-scaled-mm (torch._scaled_mm)", reason is None, reason or "")
            .kernel("fp8-reference (PyTorch dequantize + matmul)", True, "runs on every device"))


@hookimpl
def repack_checkpoint(config, tensors, target: RepackTarget):
    if config is None or config.family != FAMILY:
        return None
    if config.online and target.kind == "checkpoint":
        return checkpoint_stream(config, tensors, target)
    if config.param("unit_scale_layers") and target.kind == "runtime":
        return _with_unit_scales(tensors, set(config.param("unit_scale_layers")))
    return None


def _with_unit_scales(tensors, layers: set[str]):
    """An FP8 weight stored with no scale is its own value: give it a weight_scale of one."""
    for name, tensor in tensors:
        yield name, tensor
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix in layers:
            yield f"{prefix}.weight_scale", torch.ones((), dtype=torch.float32, device=tensor.device)
