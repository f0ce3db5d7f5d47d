"""msmodelslim's per-layer schemes: the tensors of each (runtime names, after ``repack``) and the
forward as the Ascend runtimes (vllm-ascend, SGLang-Diffusion) compute it.

Per quantized linear, [N, K] = [out_features, in_features]:
  W8A8           weight int8 [N, K]; quant_bias int32 [N]; input_scale, input_offset fp32 [1];
                 deq_scale fp32 [N] (stored int64 = the fp32 bits, for fp16 models; repack decodes)
                 xq = clamp(round(x / input_scale + input_offset), -128, 127)
                 y  = (xq @ weight^T + quant_bias) * deq_scale    (the float bias is folded into quant_bias)
  W8A8_DYNAMIC   weight int8 [N, K]; weight_scale fp32 [N, 1]; weight_offset fp32 [N, 1] (zeros)
  W4A4_DYNAMIC   the same, weight holding int4 values in [-8, 7] one per int8
                 s = rowmax|x| / Q (Q = 127, or 7); xq = round(x / s)
                 y  = (xq @ (weight - weight_offset)^T) * s * weight_scale + bias
  W8A8_MXFP8     weight float8_e4m3fn [N, K]; weight_scale uint8 [N, K/32] (E8M0)
                 y = mx(x) @ (weight * 2^(weight_scale - 127))^T + bias, mx = per-32 E4M3, OCP scale, rint
  W4A4_MXFP4     weight uint8 [N, K/2] (E2M1, low nibble first); weight_scale uint8 [N, K/32]
                 y = mx4(x) @ W^T + bias, mx4 = per-32 E2M1 with the scale rule of
                 npu_dynamic_mx_quant(scale_alg=2, dst_type_max=7.25) and round_mode "round" (SGLang's
                 defaults; the description's mxfp4_scale_alg / mxfp4_dst_type_max override them)
  W4A4_MXFP4_DUALSCALE  as W4A4_MXFP4 plus weight_dual_scale fp32 [N, K/512, 1]:
                 W = code * 2^(weight_scale - 127) * weight_dual_scale; x by the dual-level rule
  any scheme     mul_scale fp32 [K] (msmodelslim ``<layer>.div.mul_scale``): x * mul_scale first
Integer products are summed exactly (float64 where the device has it). See ``numerics.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.numerics.e2m1 import pack_e2m1, unpack_e2m1

from . import numerics

INT_SCHEMES = ("W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC")
MX_SCHEMES = ("W8A8_MXFP8", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE")
SCHEMES = INT_SCHEMES + MX_SCHEMES
QMAX = {"W8A8_DYNAMIC": 127, "W4A4_DYNAMIC": 7}
# Types msmodelslim writes that diffgen recognises but does not load.
KNOWN_UNSUPPORTED = ("W8A16", "W8A8_MIX", "W4A8_MXFP", "WFP8AFP8_DYNAMIC", "W16A16S", "W4A4_MXFP4_SVD",
                     "W4A4_MXFP4_FLATQUANT", "W4A4_FLATQUANT_DYNAMIC", "W8A8_SVD_DYNAMIC")


def mx_k(in_features: int) -> int:
    """K rounded up to whole 32-blocks."""
    return -(-in_features // numerics.MX_BLOCK) * numerics.MX_BLOCK


def tensor_specs(scheme: str, n: int, k: int, *, weight_offset: bool = True, smooth: bool = False
                 ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors one layer of ``scheme`` has at run time (bias aside)."""
    f32 = torch.float32
    if scheme == "W8A8":
        specs = {"weight": ((n, k), torch.int8), "quant_bias": ((n,), torch.int32), "input_scale": ((1,), f32),
                 "input_offset": ((1,), f32), "deq_scale": ((n,), f32)}
    elif scheme in QMAX:
        specs = {"weight": ((n, k), torch.int8), "weight_scale": ((n, 1), f32)}
        if weight_offset:
            specs["weight_offset"] = ((n, 1), f32)
    elif scheme == "W8A8_MXFP8":
        specs = {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": ((n, mx_k(k) // 32), torch.uint8)}
    elif scheme in ("W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE"):
        specs = {"weight": ((n, mx_k(k) // 2), torch.uint8), "weight_scale": ((n, mx_k(k) // 32), torch.uint8)}
        if scheme == "W4A4_MXFP4_DUALSCALE":
            specs["weight_dual_scale"] = ((n, -(-k // numerics.DUAL_BLOCK), 1), f32)
    else:
        raise ValueError(f"unknown msmodelslim scheme {scheme!r}")
    if smooth:
        specs["mul_scale"] = ((k,), f32)
    return specs


# -- online quantization (the NPU's own rules, so the reference stores what the NPU would) -----
def quantize_weight(scheme: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 16-bit weight [N, K] as ``scheme``'s tensors: MXFP8 by npu_dynamic_mx_quant's defaults
    (OCP scale, rint), dual-scale MXFP4 by npu_dynamic_dual_level_mx_quant."""
    if scheme == "W8A8_MXFP8":
        q, s = numerics.quantize_mx(w, "e4m3", "ocp", "rint")
        return {"weight": q[:, : w.shape[1]].contiguous(), "weight_scale": s}
    if scheme == "W4A4_MXFP4_DUALSCALE":
        codes, l0, l1 = numerics.dual_level_quantize(w)
        return {"weight": pack_e2m1(codes), "weight_scale": l1, "weight_dual_scale": l0[..., None]}
    raise ValueError(f"online quantization to {scheme} is not implemented")


# -- the definition ------------------------------------------------------------------------
def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def dequantize_weight(scheme: str, layer, in_features: int) -> torch.Tensor:
    """An MX scheme's weight in fp32 [N, in_features]."""
    if scheme == "W8A8_MXFP8":
        return numerics.dequantize_mx(layer.weight, layer.weight_scale, in_features)
    codes = unpack_e2m1(layer.weight)
    if scheme == "W4A4_MXFP4":
        return numerics.dequantize_mx(codes, layer.weight_scale, in_features)
    return numerics.dual_level_dequantize(codes, layer.weight_dual_scale, layer.weight_scale, in_features)


def quantize_activations_mx(scheme: str, x: torch.Tensor, params: dict) -> torch.Tensor:
    """x [M, K] fake-quantized as the scheme's NPU kernels quantize activations (fp32)."""
    if scheme == "W8A8_MXFP8":
        return numerics.fake_quantize_mx(x, "e4m3", "ocp", "rint")
    if scheme == "W4A4_MXFP4":
        alg, c = params.get("mxfp4_scale_alg", 2), params.get("mxfp4_dst_type_max", 7.25)
        rule = "ocp" if alg == 0 else "npu_alg2"
        return numerics.fake_quantize_mx(x, "e2m1", rule, "round", c)
    return numerics.fake_dual_level(x)


def quantize_activations_int(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: (xq fp32 integers [M, K], s fp32 [M, 1]); a zero row gets s = 0, xq = 0."""
    s = x.float().abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x.float() / safe).clamp(-qmax, qmax), s


def quantize_activations_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """W8A8's static asymmetric int8 (fp32 integers), x times the reciprocal scale as npu_quantize does."""
    recip = 1.0 / input_scale.float().reshape(())
    return torch.round(x.float() * recip + input_offset.float().reshape(())).clamp(-128, 127)


def reference_linear(scheme: str, layer, x: torch.Tensor, bias: torch.Tensor | None, params: dict) -> torch.Tensor:
    """The scheme's forward on [M, K] inputs, in fp32 (integer sums exact); returns fp32 [M, N]."""
    if getattr(layer, "mul_scale", None) is not None:
        x = x.float() * layer.mul_scale.float()
    if scheme in MX_SCHEMES:
        w = dequantize_weight(scheme, layer, layer.in_features)
        y = F.linear(quantize_activations_mx(scheme, x, params), w)
        return y if bias is None else y + bias.float()
    exact = _exact_dtype(x.device)
    if scheme == "W8A8":
        xq = quantize_activations_static(x, layer.input_scale, layer.input_offset)
        acc = F.linear(xq.to(exact), layer.weight.to(exact)) + layer.quant_bias.to(exact)
        return (acc * layer.deq_scale.to(exact).reshape(-1)).float()
    xq, s = quantize_activations_int(x, QMAX[scheme])
    w = layer.weight.to(exact)
    if getattr(layer, "weight_offset", None) is not None:
        w = w - layer.weight_offset.to(exact).reshape(-1, 1)
    acc = F.linear(xq.to(exact), w)
    y = (acc * s.to(exact) * layer.weight_scale.to(exact).reshape(1, -1)).float()
    return y if bias is None else y + bias.float()


def pack_float_fp4(weight: torch.Tensor) -> torch.Tensor:
    """The pre-2026-04 msmodelslim MXFP4 weight (E2M1 values in float8_e4m3fn, one per byte) as
    packed E2M1 bytes; None when some value is not an E2M1 value."""
    from diffgen.numerics.e2m1 import e2m1_to_float, float_to_e2m1

    values = weight.float()
    codes = float_to_e2m1(values) | (torch.signbit(values).to(torch.uint8) << 3)  # -0.0 keeps its sign
    if weight.shape[-1] % 2 or not torch.equal(e2m1_to_float(codes), values):
        return None
    return pack_e2m1(codes)
