"""MXFP4 linears (OCP MX v1.0, E2M1 elements in groups of 32 along K, one E8M0 scale per group):
online ``--quantization mxfp4`` and AMD Quark MXFP4 checkpoints, and their reference method.

Tensors per quantized linear (Quark's ``real_quantized`` export, after ``quark.runtime_names``):
  weight        uint8 [N, Kp/2]    two E2M1 codes per byte along K, element 2i in the low nibble
  weight_scale  uint8 [N, Kp/32]   E8M0 byte b = 2^(b - 127) per group of 32 (Quark writes it
                                   as ``weight_quantizer.scale``)
with Kp = K rounded up to a multiple of 32. Online quantization receives the 16-bit weight [N, K]
and quantizes it as it arrives (``process_weights_after_loading``).
Forward (scheme ``w4a4``): y = q(x) @ W^T + b, W[n, k] = e2m1(code) * 2^(scale[n, k // 32] - 127),
q(x) = x rounded to MXFP4 group by group along K at every call (dynamic, no stored input scale).
``w4a16`` leaves x 16-bit. Scales follow the "even" rule of AMD Quark's export and of aiter's
``dynamic_mxfp4_quant`` (what SGLang-Diffusion's ``--quantization mxfp4`` runs), elements round to
nearest even and saturate at 6 (``diffgen.numerics.e8m0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.errors import LoadError
from diffgen.linear import LinearMethod, QuantLinear, TensorShard, packed4_tp_shards, register_weight
from diffgen.numerics.e2m1 import pack_e2m1, unpack_e2m1
from diffgen.numerics.e8m0 import E8M0_NAN, SCALE_ROUNDINGS, dequantize_mx, quantize_mx
from diffgen.quant import LayerSpec, QuantClaim, QuantConfig, default_online_ignore

FAMILY = "mxfp4"
GROUP = 32
SCHEMES = ("w4a4", "w4a16")
DEFAULT_ROUNDING = "even"
# SGLang-Diffusion keeps linears with fewer outputs than this in 16-bit: aiter's ASM gemm_a4w4 loses
# precision when N is below its tile. diffgen does the same on every device, so one flag quantizes
# the same layers on an MI355X, an H100 and the CPU.
MIN_OUT_FEATURES = 256
_SIXTEEN_BIT = (torch.float16, torch.bfloat16, torch.float32)


def padded_k(in_features: int) -> int:
    return -(-in_features // GROUP) * GROUP


def quantize_mxfp4(x: torch.Tensor, rounding: str = DEFAULT_ROUNDING) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., K] -> (codes packed uint8 [..., Kp/2], E8M0 scales uint8 [..., Kp/32]); K is
    zero-padded to Kp, which changes no group's amax. A value that rounds to zero gets code 0,
    never 8 (-0), as Quark's export writes it: the same bytes, not only the same values."""
    pad = -x.shape[-1] % GROUP
    codes, scales = quantize_mx(F.pad(x.float(), (0, pad)), "e2m1", GROUP, rounding=rounding)
    codes = torch.where(codes == 8, torch.zeros_like(codes), codes)
    return pack_e2m1(codes), scales


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, k: int | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition above: [..., Kp/2] codes and [..., Kp/32] scales -> [..., k] values."""
    out = dequantize_mx(unpack_e2m1(packed), scales.view(torch.uint8), "e2m1", GROUP)
    return (out if k is None else out[..., :k]).to(dtype)


def fake_quantize_mxfp4(x: torch.Tensor, rounding: str = DEFAULT_ROUNDING) -> torch.Tensor:
    """``x`` rounded to MXFP4 and back, group by group along its last dim (W4A4 activations)."""
    packed, scales = quantize_mxfp4(x, rounding)
    return dequantize_mxfp4(packed, scales, x.shape[-1], x.dtype)


def online_claim(source, request) -> QuantClaim:
    """``--quantization mxfp4`` on a 16-bit checkpoint. Linears with fewer than MIN_OUT_FEATURES
    outputs go in the config's ignore list by their exact names (the shapes come from the header),
    except those diffgen keeps 16-bit anyway (DEFAULT_ONLINE_IGNORES), whose reason says so."""
    model_class = str(source.config.get("_class_name", ""))

    def kept_by_default(layer: str) -> bool:
        return not request.quantize_all_layers and default_online_ignore(model_class, layer) is not None

    small = sorted(layer for name, info in source.tensors.items()
                   if name.endswith(".weight") and len(info.shape) == 2 and info.dtype in _SIXTEEN_BIT
                   and info.shape[0] < MIN_OUT_FEATURES and not kept_by_default(layer := name[: -len(".weight")]))
    scheme = request.scheme or SCHEMES[0]
    config = QuantConfig.make(FAMILY, scheme=scheme,
                              params={"scale_rounding": DEFAULT_ROUNDING, "min_out_features": MIN_OUT_FEATURES},
                              ignore=tuple(small), user_ignore=tuple(request.ignored_layers), online=True,
                              provenance="--quantization mxfp4 (online)")
    activations = "activations quantized the same way at every call" if scheme == "w4a4" else "16-bit activations"
    evidence = (f"--quantization mxfp4 on a 16-bit checkpoint: MXFP4 weights (E2M1, an E8M0 scale per 32, the "
                f"'even' scale rule of aiter and Quark), {activations}; {len(small)} linears with fewer than "
                f"{MIN_OUT_FEATURES} outputs kept 16-bit, as SGLang-Diffusion does")
    unsupported = None if scheme in SCHEMES else f"mxfp4 schemes are {', '.join(SCHEMES)}, not {scheme!r}"
    return QuantClaim(config, 100, evidence, unsupported_reason=unsupported)


class Mxfp4Method(LinearMethod):
    """The stored tensors and their preparation, shared by every MXFP4 method."""

    def __init__(self, config: QuantConfig, layer: LayerSpec, **kwargs):
        super().__init__(config, layer, **kwargs)
        # Resolved once: the forward must not look anything up by layer name (torch.compile guards).
        self.scheme = config.scheme_for(layer.name) or SCHEMES[0]
        self.rounding = config.param("scale_rounding", DEFAULT_ROUNDING)
        if self.rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"unknown MX scale rounding {self.rounding!r}")
        self.kp = padded_k(layer.in_features)

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        if self.config.online:  # the 16-bit weight arrives; process_weights_after_loading quantizes it
            register_weight(layer, "weight", (out_features, in_features), dtype)
            return
        register_weight(layer, "weight", (out_features, self.kp // 2), torch.uint8)
        register_weight(layer, "weight_scale", (out_features, self.kp // GROUP), torch.uint8)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        if self.config.online and layer.weight.dtype != torch.uint8:
            packed, scales = quantize_mxfp4(layer.weight.data, self.rounding)
            layer.weight = torch.nn.Parameter(packed, requires_grad=False)
            layer.weight_scale = torch.nn.Parameter(scales, requires_grad=False)
        nan = layer.weight_scale.data.view(torch.uint8) == E8M0_NAN
        if bool(nan.any()):
            index = int(nan.flatten().nonzero()[0])
            raise LoadError(f"tensor {self.layer.name}.weight_scale holds 0xFF at flat index {index}, which is NaN "
                            "in E8M0: the checkpoint is corrupt (or the 16-bit weight held NaN)")

    # Tensors process_weights_after_loading derives per output row: name -> the axis along N.
    tp_derived: dict[str, int] = {}

    def tp_shards(self, style: str, size: int) -> dict[str, TensorShard]:
        """Column-parallel: rows of weight, weight_scale, bias and the derived per-row tensors.
        Row-parallel: the packed weight's columns in whole groups of 32 (16 bytes) with their E8M0
        scales; per-row derived tensors stay whole. MX has no global scale and rounds activations
        group by group along K, so each rank computes its elements exactly as one process does:
        only the order of summation changes. (Online: the split runs after the weight is quantized,
        on the packed tensors.)"""
        return packed4_tp_shards(self, style, size, GROUP, "MXFP4 groups")

    def dequantized_weight(self, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_mxfp4(layer.weight, layer.weight_scale, layer.in_features, dtype)

    def weight_bytes(self, layer: QuantLinear) -> int:
        if self.config.online and layer.weight.dtype != torch.uint8:  # planned, not yet quantized
            bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
            return layer.out_features * (self.kp // 2 + self.kp // GROUP) + bias
        return super().weight_bytes(layer)


class Mxfp4ReferenceMethod(Mxfp4Method):
    """The definition in plain PyTorch, on any device: dequantize the whole weight and round the
    activations to MXFP4 and back at every call, then an fp32 matmul (a 32-bit copy of the weight
    per call: slower than 16-bit)."""

    name = "mxfp4-reference"
    kind = "reference"

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.dequantized_weight(layer, torch.float32)
        xf = x.float()
        if self.scheme == "w4a4":
            xf = fake_quantize_mxfp4(xf, self.rounding)
        y = F.linear(xf, w, None if bias is None else bias.float())
        return y.to(x.dtype)
