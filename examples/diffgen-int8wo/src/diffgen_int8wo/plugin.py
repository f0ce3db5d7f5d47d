"""The diffgen hooks of the int8wo plugin (entry point ``int8wo`` in group ``diffgen``).

Detection reads config.json's ``quantization_config`` (see ``format.py``) and confirms it with
the tensors' dtypes, or claims ``--quantization int8wo`` on a 16-bit checkpoint (online: weights
quantized while they load); methods are in ``methods.py``; ``repack_checkpoint`` quantizes the
planned layers' 16-bit weights when the target is a checkpoint (``diffgen quantize --quantization
int8wo``, whose quantizer is in ``quantize.py``). Published beside the hooks (pyproject.toml): the
quantizer, a converter from optimum-quanto checkpoints (``quanto.py``) and a Z-Image rewrite
(``rewrites.py``). Only torch and diffgen are imported: no optional library is touched before a
hook asks for it.
"""

from __future__ import annotations

import torch

from diffgen import hookimpl
from diffgen.checkpoint import linears_stored_unquantized
from diffgen.platform import PlatformReport
from diffgen.quant import LayerSpec, QuantClaim, QuantConfig

from .format import QUANT_METHOD, SCHEMES, quantize_weight
from .methods import Int8woIntMMMethod, Int8woReferenceMethod, int_mm_unavailable_reason


def _confirmed_by_tensors(source) -> bool:
    tensors = source.tensors
    return any(name.endswith(".weight_scale") and getattr(tensors.get(name[: -len("_scale")]), "dtype", None)
               == torch.int8 for name in tensors)


def config_from_checkpoint(source, qc: dict) -> tuple[QuantConfig, str | None]:
    """The QuantConfig of an int8wo checkpoint, and why this variant cannot load (or None)."""
    unsupported = [f"{key}={qc[key]!r}" for key, supported in
                   (("weight_bits", 8), ("granularity", "per-channel"), ("symmetric", True))
                   if qc.get(key, supported) != supported]
    ignored = qc.get("ignored_layers") or []
    if not isinstance(ignored, list) or not all(isinstance(p, str) for p in ignored):
        unsupported.append(f"ignored_layers={ignored!r} is not a list of names")
        ignored = []
    ignore = tuple(dict.fromkeys([*ignored, *linears_stored_unquantized(source, ("weight_scale",))]))
    config = QuantConfig.make(QUANT_METHOD, scheme="per-channel", params={"weight_bits": 8}, ignore=ignore,
                              provenance="config.json quantization_config")
    reason = (f"quantization_config has {', '.join(unsupported)}; int8wo supports weight_bits=8, "
              "granularity='per-channel', symmetric=true") if unsupported else None
    return config, reason


def online_claim(request) -> QuantClaim:
    scheme = request.scheme or SCHEMES[0]
    config = QuantConfig.make(QUANT_METHOD, scheme=scheme, params={"weight_bits": 8},
                              user_ignore=tuple(request.ignored_layers), online=True,
                              provenance="--quantization int8wo (online)")
    unsupported = None if scheme in SCHEMES else f"int8wo schemes are {', '.join(SCHEMES)}, not {scheme!r}"
    return QuantClaim(config, 100, "--quantization int8wo on a 16-bit checkpoint: int8 weights, one scale per "
                      "output channel", unsupported_reason=unsupported)


@hookimpl
def detect_quant_config(source, request):
    qc = source.config.get("quantization_config")
    if request is not None and request.method == QUANT_METHOD and not qc:
        return online_claim(request)
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if not isinstance(method, str) or method.lower() != QUANT_METHOD:
        return None
    config, unsupported = config_from_checkpoint(source, qc)
    evidence = "config.json quantization_config.quant_method=int8wo"
    if _confirmed_by_tensors(source):
        return QuantClaim(config, 30, evidence + "; int8 weights with weight_scale found in the tensors",
                          unsupported_reason=unsupported)
    return QuantClaim(config, 10, evidence, unsupported_reason=unsupported)


@hookimpl
def create_linear_method(config, layer, platform):
    if config.family != QUANT_METHOD:
        return None
    return [Int8woReferenceMethod(config, layer),
            Int8woIntMMMethod(config, layer, unavailable_reason=int_mm_unavailable_reason(layer, platform))]


@hookimpl
def check_platform(platform):
    # Any layer with K and N divisible by 8 stands for "this platform" here.
    probe = LayerSpec("probe", 64, 64, False, torch.bfloat16)
    reason = int_mm_unavailable_reason(probe, platform)
    return (PlatformReport()
            .kernel("int8wo-w8a8-int-mm (torch._int_mm, activations quantized per token)", reason is None,
                    reason or "")
            .kernel("int8wo-reference (PyTorch dequantize + fp32 matmul)", True, "runs on every device"))


@hookimpl
def repack_checkpoint(config, tensors, target):
    if config is None or config.family != QUANT_METHOD or not config.online or target.kind != "checkpoint":
        return None
    quantized = set(target.quantized)  # the plan's choice: diffgen's defaults and the user's ignores applied

    def stream():
        for name, tensor in tensors:
            prefix, _, leaf = name.rpartition(".")
            if leaf == "weight" and prefix in quantized:
                weight, weight_scale = quantize_weight(tensor)
                yield name, weight
                yield f"{prefix}.weight_scale", weight_scale
            else:
                yield name, tensor

    return stream()
