"""The ``cuda`` plugin's hooks: ModelOpt checkpoints, SGLang runtime names, fused FP8 kernels.

- ``detect_quant_config``: ModelOpt FP8 exports become the builtin ``fp8`` family
  (``modelopt.py``); other ModelOpt algorithms are claimed with the reason they cannot load.
- ``repack_checkpoint``: SGLang runtime names and fused QKV to diffusers (``sglang_names.py``);
  per-shard scales to the planned layout (``modelopt.fit_scales``).
- ``create_linear_method``: the fused method of ``diffgen_cuda.fused`` (Triton activation
  quantization feeding ``torch._scaled_mm``) for the fp8 family, with the reason when it cannot
  run here; it outranks the builtin fp8 method of the same kind.

Published beside the hooks (pyproject.toml): the ``modelopt-fp8`` converter (``convert.py``) and
the FLUX.1 rewrites (``flux1.py``). Nothing here imports Triton or touches CUDA at import time:
the plugin installs and loads on a CPU-only machine, and ``fused`` imports its kernels lazily.
"""

from __future__ import annotations

from diffgen.hookspecs import hookimpl
from diffgen.platform import Platform, PlatformReport

from . import fused, modelopt, nvfp4, sglang_names


@hookimpl
def check_platform(platform: Platform):
    report = PlatformReport()
    report.notes.append("ModelOpt FP8 checkpoints load as the builtin fp8 family (fp8-scaled-mm on "
                        "SM89+, fp8-reference elsewhere); diffgen convert modelopt-fp8 builds them")
    reason = fused.triton_unavailable_reason(platform)
    report.kernel("fp8-triton-scaled-mm (fused Triton FP8 activation quantization)", reason is None, reason or "")
    return report


@hookimpl
def detect_quant_config(source):
    return modelopt.detect(source)


@hookimpl
def create_linear_method(config, layer, platform):
    return fused.offer(config, layer, platform) or nvfp4.offer(config, layer, platform)


@hookimpl
def repack_checkpoint(config, tensors, target):
    stream = tensors
    if target.model_class in sglang_names.RULES:
        stream = sglang_names.runtime_to_diffusers(stream, target)
    if config is not None and config.param("checkpoint_format") == modelopt.CHECKPOINT_FORMAT and target.kind == "runtime":
        stream = modelopt.fit_scales(stream, target)
    return None if stream is tensors else stream
