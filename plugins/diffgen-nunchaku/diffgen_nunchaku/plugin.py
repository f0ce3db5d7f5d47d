"""The ``nunchaku`` plugin's hooks: SVDQuant int4 / nvfp4 checkpoints (nunchaku, deepcompressor).

- ``repack_checkpoint``: nunchaku's names and tile-packed tensors -> diffusers' names, plain
  layouts (``layout.py``); a layout repack, so it acts for every target kind with no config.
- ``detect_quant_config``: file names, safetensors metadata, tensors and flags (``detect.py``).
- ``create_linear_method``: per layer the reference (any device), the packed4 weight-only method
  (diffgen-cuda's Triton kernel, SM80+) and nunchaku's own kernels (SM75-89, SM120), each with
  the reason when it cannot run here.
Nothing here imports nunchaku, Triton or diffgen-cuda at import time.
"""

from __future__ import annotations

from diffgen.hookspecs import hookimpl
from diffgen.platform import Platform, PlatformReport

from . import native
from .detect import FAMILY, detect, layer_format, lite_config
from .layout import nunchaku_to_diffusers
from .names import RULES
from .reference import AwqReferenceMethod, SvdqReferenceMethod
from .weight_only import AwqPacked4Method, SvdqPacked4Method, SvdqPacked4W4A8Method, packed4_reason


@hookimpl
def check_platform(platform: Platform):
    report = PlatformReport()
    lib = native.library_reason()
    for precision in ("int4", "nvfp4"):
        reason = "; ".join(r for r in (native.gpu_reason(platform, precision), lib) if r) or None
        report.kernel(f"svdq-nunchaku {precision} (nunchaku's W4A4 kernels)", reason is None, reason or "")
    from diffgen.quant import LayerSpec
    import torch

    probe = LayerSpec("probe", 128, 128, True, torch.bfloat16)
    for precision in ("int4", "nvfp4"):
        reason = packed4_reason(probe, platform, fp4=precision == "nvfp4")
        report.kernel(f"svdq-packed4 {precision} (weight-only, diffgen-cuda's 4-bit kernel)", reason is None, reason or "")
    report.kernel("svdq-w4a4-reference (PyTorch, activations quantized as the format defines)", True,
                  "runs on every device")
    if lib:
        report.notes.append(f"nunchaku: {lib}")
    return report


@hookimpl
def detect_quant_config(source, request):
    return detect(source, request)


@hookimpl
def create_linear_method(config, layer, platform):
    if config.family != FAMILY:
        return None
    fmt = layer_format(config, layer.name)
    precision = config.param("precision", "int4")
    if fmt.kind == "awq":
        native_reason = native.native_reason(layer, platform, None)
        return [AwqReferenceMethod(config, layer),
                AwqPacked4Method(config, layer, unavailable_reason=packed4_reason(layer, platform, fp4=False)),
                native.AwqNunchakuMethod(config, layer, unavailable_reason=native_reason)]
    if not fmt.parts:
        return None
    native_reason = native.native_reason(layer, platform, precision)
    if native_reason is None and any(p.k % 128 or layer.out_features % 128 or p.rank % 16 for p in fmt.parts):
        native_reason = "nunchaku's kernels need N and every input part to be multiples of 128, ranks of 16"
    return [SvdqReferenceMethod(config, layer),
            SvdqPacked4Method(config, layer, unavailable_reason=packed4_reason(layer, platform, fp4=precision == "nvfp4")),
            SvdqPacked4W4A8Method(config, layer, unavailable_reason=packed4_reason(
                layer, platform, fp4=precision == "nvfp4", fp8=True)),
            native.SvdqNunchakuMethod(config, layer, unavailable_reason=native_reason)]


@hookimpl
def repack_checkpoint(config, tensors, target):
    # A layout: it runs with config None (the planner's pass and the loader's read of the source);
    # with the svdquant config the stream is already in diffusers' names and plain layouts.
    lite = lite_config(target.model_config.get("quantization_config"))
    if config is not None or (target.model_class not in RULES and lite is None):
        return None
    return nunchaku_to_diffusers(tensors, target)
