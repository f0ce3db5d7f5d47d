"""Builtin plugin: FP8 checkpoints (``quant_method: "fp8"``) and online ``--quantization fp8``.

The tensors and the forward are in ``fp8_methods`` (the reference and ``torch._scaled_mm``), the
checkpoint ``diffgen quantize`` writes in ``fp8_offline``. Detection reads config.json's
``quantization_config`` (``activation_scheme``, ``weight_block_size``, ``ignored_layers`` /
``modules_to_not_convert``) and confirms the scheme with the scale tensors; linears the checkpoint
stores in 16-bit stay 16-bit. Online quantization stores per-channel weight scales (or the
request's scheme) and quantizes activations per token.
"""

from __future__ import annotations

from ..checkpoint import linears_stored_unquantized
from ..hookspecs import hookimpl
from ..platform import Platform, PlatformReport
from ..quant import LayerSpec, QuantClaim, QuantConfig, RepackTarget
from .fp8_methods import (SCHEMES, Fp8ReferenceMethod, Fp8ScaledMMMethod, scaled_mm_platform_reason,
                          scaled_mm_unavailable_reason)
from .fp8_offline import checkpoint_stream

FAMILY = "fp8"
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")


def _scale_scheme(source) -> str | None:
    for name, info in source.tensors.items():
        if name.endswith(".weight_scale_inv"):
            return "block"
        if name.endswith(".weight_scale"):
            return "per-tensor" if info.numel == 1 else "per-channel"
    return None


def _checkpoint_claim(source, qc: dict) -> QuantClaim:
    block = qc.get("weight_block_size")
    scheme = "block" if block else _scale_scheme(source) or "per-tensor"
    activation = str(qc.get("activation_scheme", "dynamic")).lower()
    if activation not in ("static", "dynamic"):
        raise ValueError(f"config.json quantization_config.activation_scheme={activation!r}; "
                         "expected 'static' or 'dynamic'")
    ignore = list(qc.get("ignored_layers") or []) + list(qc.get("modules_to_not_convert") or [])
    ignore += linears_stored_unquantized(source, SCALE_SUFFIXES)
    params = {"activation_scheme": activation}
    if block:
        params["block"] = tuple(int(b) for b in block)
    confirmed = _scale_scheme(source) is not None
    config = QuantConfig.make(FAMILY, scheme=scheme, params=params, ignore=tuple(dict.fromkeys(ignore)),
                              provenance="config.json quantization_config")
    evidence = f"config.json quantization_config.quant_method=fp8, activation_scheme={activation}"
    if confirmed:
        evidence += f"; {scheme} scales found in the tensors"
    return QuantClaim(config, 30 if confirmed else 10, evidence)


def online_config(ignored_layers: tuple[str, ...] = (), scheme: str = "per-channel") -> QuantConfig:
    return QuantConfig.make(FAMILY, scheme=scheme, params={"activation_scheme": "dynamic"},
                            user_ignore=tuple(ignored_layers), online=True,
                            provenance="--quantization fp8 (online)")


@hookimpl
def detect_quant_config(source, request):
    qc = source.config.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == FAMILY:
        return _checkpoint_claim(source, qc)
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
    if config is None or config.family != FAMILY or not config.online or target.kind != "checkpoint":
        return None
    return checkpoint_stream(config, tensors, target)
