"""Linear methods for msmodelslim layers off the NPU: the reference (any device) and NVIDIA's.

- ``msmodelslim-reference`` (reference): ``schemes.reference_linear``, the definition in fp32.
- ``msmodelslim-int-mm`` (native, CUDA SM80+; W8A8, W8A8_DYNAMIC, W4A4_DYNAMIC): activations
  quantized as the scheme says (static asymmetric, or per token), ``torch._int_mm`` multiplies
  int8 x int8 into int32 exactly (int4 values are int8 values), then the fp32 rescale. Integer
  arithmetic is exact, so this matches the reference up to the fp32 rescale.
  Exact, but on an H200 ``torch._int_mm`` is slower than bf16 (``benchmarks/w8a8_step.py``), so
  ``msmodelslim-fp8`` (``fp8.py``: E4M3 weights and activations, close to the definition, not
  equal) outranks it on SM89+; ``--quant-backend msmodelslim-int-mm`` asks for this one.
- ``msmodelslim-packed4`` (weight-only, CUDA SM80+; W4A4_MXFP4, dual-scale): the packed E2M1
  weight goes to diffgen-cuda's ``packed4`` kernels unchanged, with its E8M0 scales (MXFP4) or
  E8M0 x fp32 level-0 scales multiplied into one fp32 scale per 32 (dual-scale; exact, the E8M0
  factor is a power of two). Activations are fake-quantized by the scheme's rule first, so the
  layer computes the same function as on the NPU (as vLLM emulates MX off MI350).
- ``msmodelslim-mxfp8-dequant`` (weight-only, CUDA; W8A8_MXFP8): FP8 bytes and E8M0 scales stay
  resident; each call widens them to a 16-bit weight (exact: E4M3 x 2^k fits bf16) and uses cuBLAS;
  activations fake-quantized to MXFP8 first. A memory saving, not a speed-up on Hopper.
Online (``--quantization mxfp8 | mxfp4_npu``) the 16-bit weight arrives and is quantized with the
NPU's own rules when its last tensor has loaded.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from diffgen.linear import LinearMethod, QuantLinear, check_scales, register_weight
from diffgen.quant import LayerSpec, QuantConfig

from . import schemes

log = logging.getLogger("diffgen")
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: M > 16, K and N multiples of 8
INT_MM_MULTIPLE = 8
NEEDS_CUDA_PLUGIN = "needs diffgen-cuda: pip install diffgen[cuda]"
PACKED4_E8M0, PACKED4_FLOAT = 1, 2  # diffgen_cuda.packed4.E8M0 / .FLOAT (not imported here: it may be absent)


class MsmodelslimMethod(LinearMethod):
    """The scheme's tensors, shared by every method (the NPU adapters too)."""

    def __init__(self, config: QuantConfig, layer: LayerSpec, **kwargs):
        super().__init__(config, layer, **kwargs)
        self.scheme = config.scheme_for(layer.name) or config.scheme
        self.params = dict(config.params)
        self.smooth = layer.name in set(config.param("smooth_layers", ()))
        self.weight_offset = layer.name not in set(config.param("no_weight_offset", ()))

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        if self.config.online:
            register_weight(layer, "weight", (out_features, in_features), dtype)
            return
        specs = schemes.tensor_specs(self.scheme, out_features, in_features,
                                     weight_offset=self.weight_offset, smooth=self.smooth)
        for name, (shape, tensor_dtype) in specs.items():
            register_weight(layer, name, shape, tensor_dtype)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        if self.config.online and layer.weight.is_floating_point() and layer.weight.dtype != torch.float8_e4m3fn:
            for key, tensor in schemes.quantize_weight(self.scheme, layer.weight.data).items():
                setattr(layer, key, torch.nn.Parameter(tensor, requires_grad=False))
        self.check(layer)

    def check(self, layer: QuantLinear) -> None:
        """What the loaded tensors must hold for the definition to mean anything."""
        from diffgen.errors import LoadError

        check_scales(layer, "deq_scale", "input_scale", "weight_dual_scale", zero_ok=True)
        if self.scheme in schemes.QMAX:  # MX weight_scale holds E8M0 bytes, checked below
            check_scales(layer, "weight_scale", zero_ok=True)
        if self.scheme == "W4A4_DYNAMIC":
            lo, hi = int(layer.weight.min()), int(layer.weight.max())
            if lo < -8 or hi > 7:
                raise LoadError(f"tensor {self.layer.name}.weight is W4A4_DYNAMIC but holds values in [{lo}, {hi}]; "
                                "int4 values must lie in [-8, 7] (a W8A8 weight under the wrong description?)")
        if self.scheme in ("W8A8_MXFP8", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE") and bool((layer.weight_scale == 0xFF).any()):
            raise LoadError(f"tensor {self.layer.name}.weight_scale holds the E8M0 NaN byte 0xFF")

    def weight_bytes(self, layer: QuantLinear) -> int:
        if self.config.online and layer.weight.dtype in (torch.float16, torch.bfloat16, torch.float32):
            n, k = layer.weight.shape
            specs = schemes.tensor_specs(self.scheme, n, k)
            total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in specs.values())
            return total + (0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size())
        return super().weight_bytes(layer)


class MsmodelslimReferenceMethod(MsmodelslimMethod):
    name = "msmodelslim-reference"
    kind = "reference"

    def apply(self, layer, x, bias):
        x2 = x.reshape(-1, x.shape[-1])
        y = schemes.reference_linear(self.scheme, layer, x2, None if self.scheme == "W8A8" else bias, self.params)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class MsmodelslimIntMMMethod(MsmodelslimMethod):
    name = "msmodelslim-int-mm"
    kind = "native"

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        # cuBLASLt's int8 GEMM wants the [K, N] operand column-major: weight [N, K] row-major, transposed.
        layer.weight.data = layer.weight.data.contiguous()
        if self.scheme == "W8A8":
            layer.register_buffer("_deq", layer.deq_scale.data.float().reshape(1, -1), persistent=False)
        else:
            layer.register_buffer("_wscale", layer.weight_scale.data.float().reshape(1, -1), persistent=False)
            offset = getattr(layer, "weight_offset", None)
            if offset is not None and bool((offset != 0).any()):
                layer.register_buffer("_woffset", offset.data.float().reshape(1, -1), persistent=False)

    def apply(self, layer, x, bias):
        x2 = x.reshape(-1, x.shape[-1])
        if self.smooth:
            x2 = x2.float() * layer.mul_scale
        rows = x2.shape[0]
        if self.scheme == "W8A8":
            xq = schemes.quantize_activations_static(x2, layer.input_scale, layer.input_offset)
            scale = None
        else:
            xq, scale = schemes.quantize_activations_int(x2, schemes.QMAX[self.scheme])
        xq = F.pad(xq, (0, 0, 0, max(0, INT_MM_MIN_ROWS - rows))).to(torch.int8)
        acc = torch._int_mm(xq, layer.weight.t())[:rows]
        if self.scheme == "W8A8":  # bias folded into quant_bias by the exporter
            y = (acc + layer.quant_bias).float() * layer._deq
        else:
            accf = acc.float()
            if hasattr(layer, "_woffset"):  # sum_k xq (w - o) = xq @ w^T - o * sum_k xq
                accf = accf - xq[:rows].float().sum(-1, keepdim=True) * layer._woffset
            y = accf * scale * layer._wscale
            y = y if bias is None else y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def int_mm_unavailable_reason(layer: LayerSpec, platform) -> str | None:
    if platform.device_kind != "cuda" or platform.capability is None:
        return f"torch._int_mm runs on NVIDIA GPUs here; this device is {platform.device_kind}"
    if platform.capability < (8, 0):
        return f"torch._int_mm needs SM80+; this GPU is SM{platform.capability[0]}{platform.capability[1]}"
    if layer.in_features % INT_MM_MULTIPLE or layer.out_features % INT_MM_MULTIPLE:
        return f"torch._int_mm needs K and N divisible by 8; {layer.name} is K={layer.in_features}, N={layer.out_features}"
    return None


def packed4_arguments(scheme: str, layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(weight uint8 [N, Kp/2], scale [N, Kp/32], global_scale fp32 (), scale kind) for packed4,
    Kp = K rounded up to 32: MXFP4 as stored (E8M0 bytes); dual-scale with one fp32 scale per
    32-block, 2^(l1 - 127) * l0 of its 512-block."""
    from diffgen.numerics.e8m0 import e8m0_to_float

    weight = layer.weight.data.view(torch.uint8).contiguous()
    ones = torch.ones((), dtype=torch.float32, device=weight.device)
    if scheme == "W4A4_MXFP4":
        return weight, layer.weight_scale.data.contiguous(), ones, PACKED4_E8M0
    l0 = layer.weight_dual_scale.data.float().reshape(weight.shape[0], -1)
    per_32 = l0.repeat_interleave(16, dim=1)[:, : layer.weight_scale.shape[1]]
    return weight, (e8m0_to_float(layer.weight_scale.data) * per_32).contiguous(), ones, PACKED4_FLOAT


class MsmodelslimPacked4Method(MsmodelslimMethod):
    name = "msmodelslim-packed4"
    kind = "weight-only"

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        weight, scale, global_scale, kind = packed4_arguments(self.scheme, layer)
        layer.register_buffer("_p4_scale", scale, persistent=False)
        layer.register_buffer("_p4_global", global_scale, persistent=False)
        self._p4_kind = kind
        if self.scheme == "W4A4_MXFP4_DUALSCALE":  # folded into _p4_scale
            del layer.weight_dual_scale

    def apply(self, layer, x, bias):
        from diffgen_cuda import packed4

        x2 = x.reshape(-1, x.shape[-1])
        if self.smooth:
            x2 = x2.float() * layer.mul_scale
        xq = schemes.quantize_activations_mx(self.scheme, x2, self.params).to(x.dtype)
        y = packed4.linear(xq, layer.weight, layer._p4_scale, layer._p4_global, bias, layer.in_features,
                           codes=packed4.E2M1, scales=self._p4_kind, group=32)
        return y.reshape(*x.shape[:-1], -1)


class MsmodelslimMxfp8DequantMethod(MsmodelslimMethod):
    name = "msmodelslim-mxfp8-dequant"
    kind = "weight-only"

    def apply(self, layer, x, bias):
        from diffgen.numerics.e8m0 import e8m0_to_float

        x2 = x.reshape(-1, x.shape[-1])
        if self.smooth:
            x2 = x2.float() * layer.mul_scale
        n, k = layer.weight.shape
        blocks = layer.weight_scale.shape[1]
        w = F.pad(layer.weight.to(x.dtype), (0, blocks * 32 - k)).reshape(n, blocks, 32)
        w = (w * e8m0_to_float(layer.weight_scale).to(x.dtype)[..., None]).reshape(n, -1)[:, :k]
        xq = schemes.quantize_activations_mx(self.scheme, x2, self.params).to(x.dtype)
        return F.linear(xq, w, bias).reshape(*x.shape[:-1], -1)


def cuda_unavailable_reason(method: str, layer: LayerSpec, platform) -> str | None:
    if platform.device_kind != "cuda":
        return f"{method} runs on NVIDIA GPUs; this device is {platform.device_kind}"
    if layer.dtype not in (torch.bfloat16, torch.float16):
        return f"{method} computes in bf16 or fp16, not {layer.dtype}"
    if method == "msmodelslim-packed4":
        try:
            from diffgen_cuda import packed4
        except ImportError:
            return NEEDS_CUDA_PLUGIN
        return packed4.unavailable_reason(layer, platform, scales=packed4.E8M0)
    return None


_WARNED: set[tuple[str, str]] = set()


def offer(config: QuantConfig, layer: LayerSpec, platform) -> list[LinearMethod]:
    scheme = config.scheme_for(layer.name) or config.scheme
    offers: list[LinearMethod] = [MsmodelslimReferenceMethod(config, layer)]
    if scheme in schemes.INT_SCHEMES:
        offers.append(MsmodelslimIntMMMethod(config, layer, unavailable_reason=int_mm_unavailable_reason(layer, platform)))
    elif scheme == "W8A8_MXFP8":
        offers.append(MsmodelslimMxfp8DequantMethod(
            config, layer, unavailable_reason=cuda_unavailable_reason("msmodelslim-mxfp8-dequant", layer, platform)))
    else:
        offers.append(MsmodelslimPacked4Method(
            config, layer, unavailable_reason=cuda_unavailable_reason("msmodelslim-packed4", layer, platform)))
    if config.online and platform.device_kind != "npu" and (config.provenance, platform.device_kind) not in _WARNED:
        _WARNED.add((config.provenance, platform.device_kind))
        log.warning("%s: no Ascend NPU here, so its layers run diffgen's emulation (the weights quantized "
                    "as the NPU would, activations quantized and dequantized in PyTorch every call): slower "
                    "than 16-bit, for checking results, not for speed", config.provenance)
    return offers
