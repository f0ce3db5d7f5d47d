"""The ``ascend`` plugin's hooks.

- ``detect_quant_config``: msmodelslim checkpoints from ``quant_model_description*.json``
  (``description.py``), family ``msmodelslim``, a scheme per layer; with a 16-bit checkpoint,
  ``--quantization mxfp8`` (W8A8_MXFP8 weights) and ``--quantization mxfp4_npu`` (dual-level
  W4A4_MXFP4_DUALSCALE weights), specificity 100. ``mxfp4`` is the ROCm plugin's and not claimed.
- ``create_linear_method``: the reference and NVIDIA methods (``methods.py``), the torch_npu
  adapter (``npu.py``), each with the reason when it cannot run here.
- ``repack_checkpoint``: Wan's original names and msmodelslim's wrapper names to the model's
  (every target kind, names and shapes only); at run time also int64 ``deq_scale`` decoded to the
  fp32 it holds, and pre-2026-04 MXFP4 weights (E2M1 values in FP8 bytes) packed.
Published beside the hooks: the ``wan`` converter (``repack_wan.py``; ``diffgen repack wan`` and
``diffgen convert wan``). Nothing here imports torch_npu: see ``npu.py``.
"""

from __future__ import annotations

import torch

from diffgen.checkpoint import UNQUANTIZED_DTYPES
from diffgen.errors import LoadError
from diffgen.hookspecs import hookimpl
from diffgen.platform import PlatformReport
from diffgen.quant import QuantClaim, QuantConfig

from . import description, fp8, methods, npu, schemes
from .names import is_wan_original_name, strip_wrappers, wan_original_to_diffusers_name

ONLINE = {"mxfp8": "W8A8_MXFP8", "mxfp4_npu": "W4A4_MXFP4_DUALSCALE"}
WAN = "WanTransformer3DModel"


@hookimpl
def check_platform(platform):
    report = PlatformReport()
    report.kernel("msmodelslim-reference (PyTorch, every scheme)", True, "runs on every device")
    reason = methods.int_mm_unavailable_reason(_any_layer(), platform)
    report.kernel("msmodelslim-int-mm (torch._int_mm; W8A8, W8A8_DYNAMIC, W4A4_DYNAMIC)", reason is None, reason or "")
    reason = methods.cuda_unavailable_reason("msmodelslim-packed4", _any_layer(), platform)
    report.kernel("msmodelslim-packed4 (diffgen-cuda 4-bit kernels; W4A4_MXFP4, dual-scale)", reason is None, reason or "")
    npu.platform_report(platform, report)
    return report


def _any_layer():
    from diffgen.quant import LayerSpec

    return LayerSpec("any", 4096, 4096, False, torch.bfloat16)


@hookimpl
def detect_quant_config(source, request):
    claim = description.detect(source)
    if claim is not None or request is None or request.method not in ONLINE:
        return claim
    if source.config.get("quantization_config"):
        return None  # the core says a request on a quantized checkpoint is an error
    scheme = ONLINE[request.method]
    quantized = [n for n, i in source.tensors.items() if i.dtype not in (*UNQUANTIZED_DTYPES, torch.float64)]
    if quantized:
        return None
    config = QuantConfig.make(description.FAMILY, scheme=scheme, params={"request": request.method},
                              user_ignore=tuple(request.ignored_layers), online=True,
                              provenance=f"--quantization {request.method} (online)")
    unsupported = None if request.scheme in (None, scheme) else \
        f"--quantization {request.method} quantizes to {scheme}; there is no scheme {request.scheme!r}"
    return QuantClaim(config, 100, f"--quantization {request.method} on a 16-bit checkpoint: {scheme} weights, "
                                   "activations quantized per call as the NPU does", unsupported_reason=unsupported)


@hookimpl
def create_linear_method(config, layer, platform):
    if config.family != description.FAMILY or config.scheme is None:
        return None
    offers = methods.offer(config, layer, platform) + npu.offer(config, layer, platform)
    if (config.scheme_for(layer.name) or config.scheme) in schemes.INT_SCHEMES and not config.online:
        offers.append(fp8.MsmodelslimFp8Method(config, layer, unavailable_reason=fp8.fp8_unavailable_reason(layer, platform)))
    return offers


@hookimpl
def repack_checkpoint(config, tensors, target):
    renaming = bool(target.expected) and target.kind in ("runtime", "layout")
    ours = config is not None and config.family == description.FAMILY and not config.online
    if not renaming and not ours:
        return None
    return _repacked(tensors, target, ours and target.kind == "runtime")


def _repacked(tensors, target, decode: bool):
    expected = target.expected
    is_wan = target.model_class == WAN

    def is_layer(layer: str) -> bool:
        return f"{layer}.weight" in expected

    for name, tensor in tensors:
        if name not in expected:
            if is_wan and is_wan_original_name(name):
                name = wan_original_to_diffusers_name(name)
            name = strip_wrappers(name, is_layer)
        if decode:
            tensor = _runtime_tensor(name, tensor, expected)
        yield name, tensor


def _runtime_tensor(name: str, tensor: torch.Tensor, expected) -> torch.Tensor:
    if name.endswith(".deq_scale") and tensor.dtype == torch.int64:
        return deq_scale_from_int64(tensor, name)
    if name.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn and name in expected \
            and expected[name][1] == torch.uint8 and tensor.device.type != "meta":
        packed = schemes.pack_float_fp4(tensor)
        if packed is None:
            raise LoadError(f"tensor {name} is a float8_e4m3fn MXFP4 weight (msmodelslim before 2026-04) but holds "
                            "values that are not E2M1 values")
        return packed
    return tensor


def deq_scale_from_int64(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """msmodelslim's int64 deq_scale holds each fp32 scale's bits in its low 32 bits."""
    if tensor.device.type == "meta":
        return torch.empty(tensor.shape, dtype=torch.float32, device="meta")
    low = tensor & 0xFFFFFFFF
    if bool((tensor != low).any()):
        raise LoadError(f"tensor {name} is int64 with bits set above bit 31; msmodelslim stores the fp32 scale's "
                        "bits in the low 32 (is this npu_trans_quant_param output? save the fp32 scales instead)")
    return low.to(torch.int32).view(torch.float32).clone()
