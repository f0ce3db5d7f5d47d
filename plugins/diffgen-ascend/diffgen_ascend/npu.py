"""torch_npu adapters: msmodelslim layers on Ascend NPUs through the documented torch_npu ops.

NOT RUN: no Ascend hardware was available. The argument preparation below is tested on the CPU
against the reference, with a stand-in torch_npu namespace written from the op documentation
(tests/fake_torch_npu.py); the real calls are tests marked ``npu``.

``import torch_npu`` breaks ``import torch`` on a machine without CANN, and refuses a CUDA torch, so
it happens only in :func:`torch_npu` (called by the kernels, and by ``check_platform`` when the
device is an NPU). Ops and their generations (op-plugin's yaml and docs):
  A2/A3 (910B, 910_93) and A5 (950): npu_quantize, npu_dynamic_quant, npu_quant_matmul on int8/int4
  A5 only: npu_dynamic_mx_quant, MX npu_quant_matmul, npu_dynamic_dual_level_mx_quant,
           npu_dual_level_quant_matmul
Layouts: weights transposed to [K, N] (int8, FP8, packed FP4 as a view), MX scales [N, K/32]
paired as [N, K/64, 2] (an odd block count padded with a zero byte) and transposed to
[K/64, N, 2]; the dual-level weight stays [N, K/2] in FRACTAL_NZ (format 29) with its level-1
scales [N, K/64, 2] and level-0 scales [K/512, N]. deq_scale goes to the op as float32 (bf16
models) or through npu_trans_quant_param as int64 (fp16 models), as vllm-ascend and SGLang do.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from diffgen.linear import QuantLinear
from diffgen.quant import LayerSpec

from . import schemes
from .methods import MsmodelslimMethod

FRACTAL_NZ = 29
OUTPUT_DTYPE = {torch.bfloat16: 15, torch.float16: 5, torch.float32: 6}  # torch ScalarType numbers (the op: bf16, fp16)
A5_SCHEMES = ("W8A8_MXFP8", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE")


def torch_npu():
    """The torch_npu module (imported here and only here)."""
    import torch_npu as module  # noqa: PLC0415 - lazy on purpose: see the module docstring

    return module


def installed() -> bool:
    """Whether torch_npu is installed, without importing it."""
    return importlib.util.find_spec("torch_npu") is not None


def generation(device_name: str) -> str | None:
    """"A2", "A3" or "A5" from the SoC name torch_npu reports, else None."""
    name = device_name.lower().replace(" ", "")
    if name.startswith("ascend950"):
        return "A5"
    if name.startswith("ascend910_93"):
        return "A3"
    if name.startswith("ascend910b"):
        return "A2"
    return None


@functools.lru_cache(maxsize=None)
def _soc_name(device: str) -> str:
    try:
        module = torch_npu()
        return str(module.npu.get_device_name(torch.device(device).index or 0))
    except Exception as exc:  # noqa: BLE001 - no CANN, no device: the reason is the answer
        return f"unknown ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def soc_name(platform) -> str:
    """The Ascend SoC name ("Ascend910B3", "Ascend950PR", ...), asking torch_npu if the core did not."""
    if platform.device_name.lower().startswith("ascend"):
        return platform.device_name
    return _soc_name(platform.device)


def unavailable_reason(scheme: str, layer: LayerSpec, platform) -> str | None:
    if platform.device_kind != "npu":
        return f"torch_npu kernels run on an Ascend NPU; this device is {platform.device_kind}"
    soc = soc_name(platform)
    gen = generation(soc)
    if scheme in A5_SCHEMES and gen != "A5":
        return f"{scheme} kernels (MX quant + matmul) exist on Ascend 950 (A5) only; this NPU is {soc}"
    if gen is None:
        return f"unknown Ascend SoC {soc!r}; the int8 kernels are documented for A2, A3 and A5"
    if layer.dtype not in (torch.bfloat16, torch.float16):
        return f"the NPU kernels output bf16 or fp16, not {layer.dtype}"
    if scheme == "W4A4_MXFP4_DUALSCALE" and layer.in_features % 512:
        return f"npu_dual_level_quant_matmul needs K divisible by 512; {layer.name} has K={layer.in_features}"
    if scheme == "W4A4_MXFP4" and layer.in_features % 64:
        return f"the MXFP4 matmul needs K divisible by 64; {layer.name} has K={layer.in_features}"
    if scheme == "W4A4_DYNAMIC" and (layer.in_features % 8 or layer.out_features % 8):
        return f"int4 packing needs K and N divisible by 8; {layer.name} is {layer.in_features} -> {layer.out_features}"
    return None


def paired_scales(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 scales [N, B] -> [N, ceil(B/2), 2] (an odd B padded with a zero byte)."""
    scale = F.pad(scale, (0, scale.shape[1] % 2))
    return scale.reshape(scale.shape[0], -1, 2)


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


class NpuMethod(MsmodelslimMethod):
    """One class for every scheme: ``prepare`` lays the weights out once, ``apply`` calls the ops."""

    name = "msmodelslim-npu"
    kind = "native"

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        self.prepare(layer, torch_npu())

    def prepare(self, layer: QuantLinear, npu) -> None:
        s, w = self.scheme, layer.weight.data
        if s in ("W8A8", "W8A8_DYNAMIC"):
            layer.weight = _param(w.t().contiguous())  # [K, N]
        if s == "W8A8":
            k = layer.in_features
            layer.register_buffer("_x_scale_reciprocal", (1.0 / layer.input_scale.data.float()).expand(k).contiguous()
                                  .to(layer.compute_dtype), persistent=False)
            layer.register_buffer("_x_offset", layer.input_offset.data.float().expand(k).contiguous()
                                  .to(layer.compute_dtype), persistent=False)
            deq = layer.deq_scale.data.float().reshape(-1)
            if layer.compute_dtype == torch.float16:
                deq = npu.npu_trans_quant_param(deq)
            layer.register_buffer("_deq", deq, persistent=False)
        elif s in schemes.QMAX:
            if s == "W4A4_DYNAMIC":
                layer.weight = _param(npu.npu_convert_weight_to_int4pack(w.t().contiguous().to(torch.int32)))
            layer.register_buffer("_wscale", layer.weight_scale.data.float().reshape(-1), persistent=False)
        elif s in ("W8A8_MXFP8", "W4A4_MXFP4"):
            layer.weight = _param(w.t())  # a strided view, as SGLang keeps it
            layer.register_buffer("_wscale", paired_scales(layer.weight_scale.data).transpose(0, 1), persistent=False)
        else:
            layer.weight = _param(npu.npu_format_cast(w.view(torch.int8), FRACTAL_NZ, customize_dtype=torch.int8))
            layer.register_buffer("_l1", paired_scales(layer.weight_scale.data), persistent=False)
            layer.register_buffer("_l0", layer.weight_dual_scale.data.float().reshape(w.shape[0], -1).t().contiguous(),
                                  persistent=False)
        if getattr(layer, "weight_offset", None) is not None and bool((layer.weight_offset != 0).any()):
            from diffgen.errors import LoadError

            raise LoadError(f"tensor {self.layer.name}.weight_offset is not zero; npu_quant_matmul has no weight "
                            "offset (use --quant-backend msmodelslim-reference)")

    def apply(self, layer, x, bias):
        npu = torch_npu()
        x2 = x.reshape(-1, x.shape[-1])
        out = x.dtype
        s = self.scheme
        smooth = layer.mul_scale.to(x.dtype) if self.smooth else None
        if s == "W8A8":
            if smooth is not None:
                x2 = x2 * smooth
            xq = npu.npu_quantize(x2, layer._x_scale_reciprocal, layer._x_offset, torch.qint8, -1, False)
            y = npu.npu_quant_matmul(xq, layer.weight, layer._deq, bias=layer.quant_bias, output_dtype=out)
        elif s in schemes.QMAX:
            kwargs = {"dst_type": torch.quint4x2} if s == "W4A4_DYNAMIC" else {}
            xq, tok = npu.npu_dynamic_quant(x2, smooth_scales=smooth, **kwargs)
            y = npu.npu_quant_matmul(xq, layer.weight, layer._wscale, pertoken_scale=tok, output_dtype=out)
            y = y if bias is None else y + bias
        elif s in ("W8A8_MXFP8", "W4A4_MXFP4"):
            if smooth is not None:
                x2 = x2 * smooth
            fp4 = s == "W4A4_MXFP4"
            if fp4:
                qx, sx = npu.npu_dynamic_mx_quant(x2, dst_type=npu.float4_e2m1fn_x2, round_mode="round",
                                                  scale_alg=self.params.get("mxfp4_scale_alg", 2),
                                                  dst_type_max=self.params.get("mxfp4_dst_type_max", 7.25))
                dtypes = {"x1_dtype": npu.float4_e2m1fn_x2, "x2_dtype": npu.float4_e2m1fn_x2}
            else:
                qx, sx = npu.npu_dynamic_mx_quant(x2, dst_type=torch.float8_e4m3fn)
                dtypes = {}
            y = npu.npu_quant_matmul(qx, layer.weight, layer._wscale, scale_dtype=npu.float8_e8m0fnu,
                                     pertoken_scale=sx, pertoken_scale_dtype=npu.float8_e8m0fnu,
                                     bias=None if bias is None else bias.float(), output_dtype=out,
                                     group_sizes=[1, 1, 32], **dtypes)
        else:
            if smooth is not None:
                x2 = x2 * smooth
            qx, x_l0, x_l1 = npu.npu_dynamic_dual_level_mx_quant(x2, smooth_scale=None)
            y = npu.npu_dual_level_quant_matmul(qx, layer.weight, x_l0, layer._l0, x_l1, layer._l1,
                                                bias=None if bias is None else bias.float(),
                                                output_dtype=OUTPUT_DTYPE[out])
        return y.reshape(*x.shape[:-1], -1)


def offer(config, layer: LayerSpec, platform) -> list[NpuMethod]:
    scheme = config.scheme_for(layer.name) or config.scheme
    return [NpuMethod(config, layer, unavailable_reason=unavailable_reason(scheme, layer, platform))]


def platform_report(platform, report) -> None:
    """Add the NPU kernels to ``report``: imports torch_npu only when the device is an NPU."""
    if platform.device_kind != "npu":
        where = "installed, not imported" if installed() else "not installed"
        reason = f"this device is {platform.device_kind}; torch_npu ({where}) is used only with --device npu"
        report.kernel("msmodelslim-npu int8/int4 (torch_npu, A2/A3/A5)", False, reason)
        report.kernel("msmodelslim-npu MXFP8/MXFP4/dual-scale (torch_npu, A5)", False, reason)
        return
    status = platform.library("torch_npu")
    if not status.available:
        reason = f"torch_npu not importable: {status.reason}"
        report.kernel("msmodelslim-npu int8/int4 (torch_npu, A2/A3/A5)", False, reason)
        report.kernel("msmodelslim-npu MXFP8/MXFP4/dual-scale (torch_npu, A5)", False, reason)
        return
    soc = soc_name(platform)
    gen = generation(soc)
    report.kernel("msmodelslim-npu int8/int4 (torch_npu, A2/A3/A5)", gen is not None,
                  "" if gen else f"unknown SoC {soc!r}")
    report.kernel("msmodelslim-npu MXFP8/MXFP4/dual-scale (torch_npu, A5)", gen == "A5",
                  "" if gen == "A5" else f"Ascend 950 (A5) only; this NPU is {soc}")
    report.notes.append("the torch_npu adapters follow the op documentation and have not been run by diffgen's tests")
