"""AMD Quark MXFP4 checkpoints (``quant_method: "quark"``), as ``export_safetensors(model, dir,
custom_mode="quark", weight_format="real_quantized", pack_method="reorder")`` writes a diffusers model.

Tensors per quantized linear (amd-quark 0.13, checked on the CPU, ``tests/make_quark_fixtures.py``):
  weight                          uint8 [N, K/2]   E2M1 codes, element 2i in the low nibble
  weight_quantizer.scale          uint8 [N, K/32]  E8M0 (LLM exports call it ``weight_scale``)
  bias                            16/32-bit [N], as every excluded linear's weight
config.json ``quantization_config``: ``global_quant_config.weight`` and ``.input_tensors`` (dtype
"fp4", qscheme "per_group", group_size 32, scale_format "e8m0", scale_calculation_mode "even",
round_method "half_even"; activations ``is_dynamic``), ``exclude`` (the concrete module names kept
16-bit), ``export.weight_format`` / ``export.pack_method``. Forward: the ``mxfp4`` family
(``mxfp4.py``): W4A4 with dynamic activations, or W4A16 when ``input_tensors`` is null.
``runtime_names`` renames ``weight_quantizer.scale`` to ``weight_scale`` before detection.
"""

from __future__ import annotations

import torch

from diffgen.checkpoint import linears_stored_unquantized
from diffgen.quant import QuantClaim, QuantConfig, TensorStream

from .mxfp4 import FAMILY, GROUP

CHECKPOINT_FORMAT = "quark"
QUARK_SCALE = ".weight_quantizer.scale"
SCALE = ".weight_scale"
# Quark's scale_calculation_mode -> diffgen.numerics.e8m0 rounding
SCALE_RULES = {"even": "even", None: "even"}
SUPPORTED = ("diffgen-rocm loads Quark MXFP4: fp4 weights per_group 32 with e8m0 scales, activations "
             "dynamic fp4 per_group 32 or not quantized, exported with weight_format='real_quantized' "
             "and pack_method='reorder'")


def runtime_names(tensors: TensorStream) -> TensorStream:
    """``<layer>.weight_quantizer.scale`` (uint8) -> ``<layer>.weight_scale``; the rest unchanged."""
    for name, tensor in tensors:
        if name.endswith(QUARK_SCALE) and tensor.dtype == torch.uint8:
            name = name[: -len(QUARK_SCALE)] + SCALE
        yield name, tensor


def _mx_spec_problem(spec, role: str) -> str | None:
    """What in one of Quark's quant specs is not MXFP4 (fp4, per_group 32, e8m0), or None."""
    if not isinstance(spec, dict):
        return f"{role} is {spec!r}, not a quant spec"
    required = {"dtype": "fp4", "qscheme": "per_group", "group_size": GROUP}
    optional = {"scale_format": "e8m0"}  # older exports leave it out
    for key, want in [*required.items(), *((k, v) for k, v in optional.items() if k in spec)]:
        if spec.get(key) != want:
            return f"{role}.{key}={spec.get(key)!r} (MXFP4 needs {want!r})"
    if spec.get("scale_calculation_mode") not in SCALE_RULES:
        return f"{role}.scale_calculation_mode={spec.get('scale_calculation_mode')!r} (diffgen knows 'even')"
    if spec.get("round_method", "half_even") != "half_even":
        return f"{role}.round_method={spec.get('round_method')!r} (diffgen rounds half to even)"
    return None


def _layer_spec_problem(layer_config, where: str) -> str | None:
    if not isinstance(layer_config, dict):
        return f"{where} is {layer_config!r}, not a layer config"
    problem = _mx_spec_problem(layer_config.get("weight"), f"{where}.weight")
    if problem is None and layer_config.get("weight", {}).get("is_dynamic"):
        problem = f"{where}.weight.is_dynamic is true (weights must be stored quantized)"
    inputs = layer_config.get("input_tensors")
    if problem is None and inputs is not None:
        problem = _mx_spec_problem(inputs, f"{where}.input_tensors")
        if problem is None and not inputs.get("is_dynamic"):
            problem = f"{where}.input_tensors.is_dynamic is false (static MX activation scales)"
    if problem is None and layer_config.get("output_tensors") is not None:
        problem = f"{where}.output_tensors is set (output quantization)"
    return problem


def _declaration_problem(qc: dict) -> str | None:
    export = qc.get("export") if isinstance(qc.get("export"), dict) else {}
    if export.get("weight_format", "real_quantized") != "real_quantized":
        return (f"export.weight_format={export.get('weight_format')!r}: the weights are stored dequantized; "
                "export with weight_format='real_quantized'")
    if export.get("pack_method", "reorder") != "reorder":
        return f"export.pack_method={export.get('pack_method')!r}; export with pack_method='reorder'"
    problem = _layer_spec_problem(qc.get("global_quant_config"), "global_quant_config")
    for key in ("layer_quant_config", "layer_type_quant_config"):
        for pattern, layer_config in (qc.get(key) or {}).items():
            problem = problem or _layer_spec_problem(layer_config, f"{key}[{pattern!r}]")
            if problem is None and (layer_config.get("input_tensors") is None) != \
                    (qc["global_quant_config"].get("input_tensors") is None):
                problem = f"{key}[{pattern!r}] quantizes activations differently from global_quant_config"
    exclude = qc.get("exclude", [])
    if problem is None and not (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
        problem = f"exclude={exclude!r}; expected a list of module names"
    return problem


def mxfp4_layers(source) -> dict[str, str]:
    """Layers the tensors show as MXFP4: prefix -> "ok", or what is wrong with their shapes."""
    out = {}
    for name, info in source.tensors.items():
        if not (name.endswith(".weight") and info.dtype == torch.uint8 and len(info.shape) == 2):
            continue
        prefix = name[: -len(".weight")]
        # the runtime name after runtime_names, or Quark's own when detection sees the raw header
        scale = source.tensors.get(prefix + SCALE) or source.tensors.get(prefix + QUARK_SCALE)
        if scale is None:
            out[prefix] = "no weight_scale"
        elif scale.dtype != torch.uint8 or tuple(scale.shape) != (info.shape[0], 2 * info.shape[1] // GROUP) \
                or (2 * info.shape[1]) % GROUP:
            out[prefix] = f"weight {tuple(info.shape)} with weight_scale {str(scale.dtype)[6:]} {tuple(scale.shape)}"
        else:
            out[prefix] = "ok"
    return out


def detect(source) -> QuantClaim | None:
    qc = source.config.get("quantization_config")
    if not (isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == CHECKPOINT_FORMAT):
        return None
    where = getattr(source, "declared_in", "config.json")
    evidence = f"quantization_config.quant_method=quark in {where}"
    problem = _declaration_problem(qc)
    layers = mxfp4_layers(source)
    bad = {p: why for p, why in layers.items() if why != "ok"}
    if problem is None and bad:
        prefix, why = next(iter(bad.items()))
        problem = f"{len(bad)} packed weights do not have MXFP4's scales, e.g. {prefix}: {why}"
    if problem is None and not layers:
        problem = "no linear in the tensors is stored as packed FP4 (uint8 weight with an E8M0 weight_scale)"
    if problem is not None:
        config = QuantConfig.make(FAMILY, provenance=f"AMD Quark quantization_config in {where}")
        return QuantClaim(config, 30, evidence, unsupported_reason=f"{problem}; {SUPPORTED}")
    global_config = qc["global_quant_config"]
    inputs = global_config.get("input_tensors")
    scheme = "w4a16" if inputs is None else "w4a4"
    rounding = SCALE_RULES[(inputs or global_config["weight"]).get("scale_calculation_mode")]
    ignore = list(qc.get("exclude", [])) + linears_stored_unquantized(source, ("weight_scale", QUARK_SCALE[1:]))
    config = QuantConfig.make(FAMILY, scheme=scheme, params={"scale_rounding": rounding,
                                                            "checkpoint_format": CHECKPOINT_FORMAT},
                              ignore=tuple(dict.fromkeys(ignore)), provenance=f"AMD Quark quantization_config in {where}")
    activations = "dynamic fp4 activations" if inputs is not None else "16-bit activations"
    evidence += (f", MXFP4 weights (fp4 per_group 32, e8m0), {activations}; {len(layers)} packed FP4 weights "
                 f"with E8M0 scales in the tensors, {len(config.ignore)} linears excluded")
    return QuantClaim(config, 30, evidence)
