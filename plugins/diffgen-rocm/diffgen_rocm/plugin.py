"""The ``rocm`` plugin's hooks: MXFP4 (online and AMD Quark checkpoints) and FP8 e4m3fnuz on MI300.

- ``detect_quant_config``: AMD Quark exports (``quant_method: "quark"``) with MXFP4 weights become
  the ``mxfp4`` family (``quark.py``); other Quark schemes are claimed with the reason they cannot
  load. ``--quantization mxfp4`` on a 16-bit checkpoint is claimed as online MXFP4 (``mxfp4.py``).
- ``repack_checkpoint``: Quark's ``weight_quantizer.scale`` is named ``weight_scale``, for every
  kind of stream (the planner's layout pass included), so detection and loading see one layout.
- ``create_linear_method``: for ``mxfp4`` the reference (any device), the weight-only method through
  diffgen-cuda's packed 4-bit kernel (NVIDIA SM80+) and the aiter W4A4 adapter (gfx950); for the
  builtin ``fp8`` family the e4m3fnuz method (MI300). Each offer says why when it cannot run here.

Nothing here imports aiter, Triton or diffgen-cuda at import time.
"""

from __future__ import annotations

import torch

from diffgen.hookspecs import hookimpl
from diffgen.platform import Platform, PlatformReport
from diffgen.quant import LayerSpec

from . import mxfp4, quark
from .aiter_mxfp4 import AiterMxfp4Method, aiter_platform_reason, aiter_unavailable_reason
from .fp8_fnuz import Fp8FnuzMethod, fnuz_platform_reason, fnuz_unavailable_reason
from .mxfp4_cuda import Mxfp4Packed4Method, Mxfp4Packed4W4A8Method, packed4_unavailable_reason


@hookimpl
def check_platform(platform: Platform):
    report = PlatformReport()
    aiter = aiter_platform_reason(platform)
    report.kernel("mxfp4-aiter-a4w4 (aiter dynamic_mxfp4_quant + gemm_a4w4, gfx950; adapter, not run)",
                  aiter is None, aiter or "")
    probe = LayerSpec("probe", 4096, 4096, False, torch.bfloat16)
    packed4 = packed4_unavailable_reason(probe, platform)
    report.kernel("mxfp4-packed4 (diffgen-cuda Triton dequantize + cuBLAS, W4A16, NVIDIA SM80+)",
                  packed4 is None, packed4 or "")
    w4a8 = packed4_unavailable_reason(probe, platform, True)
    report.kernel("mxfp4-packed4-w4a8 (diffgen-cuda Triton dequantize to FP8 + torch._scaled_mm, NVIDIA SM89+)",
                  w4a8 is None, w4a8 or "")
    fnuz = fnuz_platform_reason(platform)
    report.kernel("rocm-fp8-fnuz (torch._scaled_mm / hipBLASLt with e4m3fnuz weights, MI300; adapter, not run)",
                  fnuz is None, fnuz or "")
    report.kernel("mxfp4-reference (PyTorch dequantize + fake-quantized activations + matmul)", True,
                  "runs on every device")
    return report


@hookimpl
def detect_quant_config(source, request):
    claim = quark.detect(source)
    if claim is not None:
        return claim
    if request is not None and request.method == mxfp4.FAMILY and not source.config.get("quantization_config"):
        return mxfp4.online_claim(source, request)
    return None


@hookimpl
def create_linear_method(config, layer, platform):
    if config.family == mxfp4.FAMILY:
        scheme = config.scheme_for(layer.name) or mxfp4.SCHEMES[0]
        return [mxfp4.Mxfp4ReferenceMethod(config, layer),
                Mxfp4Packed4Method(config, layer, unavailable_reason=packed4_unavailable_reason(layer, platform)),
                Mxfp4Packed4W4A8Method(config, layer, unavailable_reason=packed4_unavailable_reason(layer, platform, True)),
                AiterMxfp4Method(config, layer, unavailable_reason=aiter_unavailable_reason(layer, platform, scheme))]
    if config.family == "fp8":
        return Fp8FnuzMethod(config, layer, unavailable_reason=fnuz_unavailable_reason(config, layer, platform))
    return None


@hookimpl
def repack_checkpoint(config, tensors, target):
    if target.kind == "layout" or (config is not None and config.param("checkpoint_format") == quark.CHECKPOINT_FORMAT):
        return quark.runtime_names(tensors)
    return None
