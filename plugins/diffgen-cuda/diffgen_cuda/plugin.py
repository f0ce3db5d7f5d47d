"""The ``cuda`` plugin's hooks: ModelOpt checkpoints, SGLang runtime names, fused FP8 and NVFP4 kernels.

- ``detect_quant_config``: ModelOpt FP8 exports become the builtin ``fp8`` family, ModelOpt NVFP4,
  W4A16_NVFP4, NVFP4_AWQ and NVFP4_SVD exports (or NVFP4 tensors with no declaration) the ``nvfp4`` family,
  ModelOpt INT8 (W8A8_SQ_PER_CHANNEL) the ``modelopt-int8`` family (``modelopt_int8.py``, reference only),
  ModelOpt FP8 exports with smoothing or SVDQuant branches the ``modelopt-fp8-extras`` family and
  FP8_PB_WO (block weight-only) the ``modelopt-fp8-pb-wo`` family (``modelopt_fp8.py``, the latter
  reference only) (``modelopt.py``, ``nvfp4.py``); other ModelOpt algorithms are claimed with the reason they
  cannot load.
- ``repack_checkpoint``: SGLang runtime names and fused QKV to diffusers (``sglang_names.py``);
  per-shard scales to the planned layout (``modelopt.fit_scales``); NVFP4 exports packed
  high-nibble-first or with tiled scales to ModelOpt's layout (``nvfp4.runtime_layout``).
- ``create_linear_method``: for the fp8 family the fused method of ``diffgen_cuda.fused`` (Triton
  activation quantization feeding ``torch._scaled_mm``), which outranks the builtin fp8 method of
  the same kind (for modelopt-fp8-extras, both with the extras around them); for nvfp4 the reference, the Hopper method (packed weights, a Triton dequantize
  pass and cuBLAS) and the Blackwell adapter (``nvfp4_blackwell.py``, not run); each with the
  reason when it cannot run here.

Published beside the hooks (pyproject.toml): the ``modelopt-fp8`` and ``modelopt-nvfp4`` converters
(``convert.py``, ``convert_nvfp4.py``) and the FLUX.1 rewrites (``flux1.py``). Nothing here imports
Triton or touches CUDA at import time: the plugin installs and loads on a CPU-only machine, and
the kernels are imported lazily.
"""

from __future__ import annotations

from diffgen.hookspecs import hookimpl
from diffgen.platform import Platform, PlatformReport

from . import fused, modelopt, modelopt_fp8, modelopt_int8, nvfp4, nvfp4_blackwell, nvfp4_w4a8, sglang_names


@hookimpl
def check_platform(platform: Platform):
    report = PlatformReport()
    report.notes.append("ModelOpt FP8 checkpoints load as the builtin fp8 family (fp8-scaled-mm on "
                        "SM89+, fp8-reference elsewhere); diffgen convert modelopt-fp8 builds them")
    reason = fused.triton_unavailable_reason(platform)
    report.kernel("fp8-triton-scaled-mm (fused Triton FP8 activation quantization)", reason is None, reason or "")
    from .attention_fp8 import unavailable_reason as attention_reason  # a light module: Triton loads at the first call

    reason = attention_reason(platform)
    report.kernel("attention-fp8 (INT8 Q.K^T, FP8 P.V Triton attention: --attention fp8)", reason is None, reason or "")
    return report


@hookimpl
def detect_quant_config(source):
    return modelopt.detect(source)


@hookimpl
def create_linear_method(config, layer, platform):
    if config.family == nvfp4.FAMILY:
        return (nvfp4.offer(config, layer, platform) + nvfp4_w4a8.offer(config, layer, platform)
                + nvfp4_blackwell.offer(config, layer, platform))
    if config.family == modelopt_int8.FAMILY:
        return modelopt_int8.offer(config, layer, platform)
    if config.family == modelopt_fp8.FAMILY:
        return modelopt_fp8.offer(config, layer, platform)
    if config.family == modelopt_fp8.BLOCK_WO_FAMILY:
        return modelopt_fp8.block_weight_only_offer(config, layer, platform)
    return fused.offer(config, layer, platform)


@hookimpl
def repack_checkpoint(config, tensors, target):
    stream = tensors
    if target.model_class in sglang_names.RULES:
        stream = sglang_names.runtime_to_diffusers(stream, target)
    if config is not None and config.param("checkpoint_format") == modelopt.CHECKPOINT_FORMAT and target.kind == "runtime":
        if config.family == nvfp4.FAMILY:
            stream = nvfp4.runtime_layout(stream, config, target)
        stream = modelopt.fit_scales(stream, target)
    return None if stream is tensors else stream
