"""msmodelslim's integer schemes on NVIDIA FP8 tensor cores: ``msmodelslim-fp8`` (native, SM89+).

On an H200 ``torch._int_mm`` is slower than the bf16 GEMM at DiT shapes and an FP8 GEMM 1.57x
faster (``docs/benchmarks/w8a8_step_H200.json``), so this is the default NVIDIA method and
``msmodelslim-int-mm`` (exact) stays selectable with ``--quant-backend msmodelslim-int-mm``.
Each layer's dequantized weight, per output row, goes onto an FP8 grid once, when it loads:

  W8A8_DYNAMIC, W4A4_DYNAMIC  W = (weight - weight_offset) * weight_scale
  W8A8                        W = weight * deq_scale / input_scale,
                              b = (quant_bias + input_offset * sum_k weight) * deq_scale
                              (xq = x / input_scale + input_offset, so (xq @ weight^T + quant_bias) *
                              deq_scale = x @ W^T + b before xq is rounded)

the integers cast to E4M3 with the row's scale beside them; activations are quantized per token to
FP8 at each call and ``torch._scaled_mm`` multiplies. W4A4's int4 values are exact in E4M3; an
int8 weight rounds to E4M3's 4 significant bits (|v| <= 16 stay exact).
Activations are 8-bit floating point instead of the scheme's int8 / int4, so the layer is close to
the definition (cosine about 0.999 per layer), not equal to it.
"""

from __future__ import annotations

import torch

from diffgen.builtin.fp8_methods import WEIGHT_ONLY_ROWS
from diffgen.numerics.fp8 import quantize_fp8_per_token
from diffgen.quant import LayerSpec

from .methods import MsmodelslimMethod

FP8 = torch.float8_e4m3fn


def dequantized_linear(scheme: str, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(integer-valued matrix M fp32 [N, K], row scale [N], folded bias or None): W = M * row scale
    is what the integer scheme's layer computes with before its activations are rounded; the bias
    is the layer's own except for W8A8, which folds it into quant_bias."""
    m = layer.weight.float()
    if scheme == "W8A8":
        deq = layer.deq_scale.float().reshape(-1)
        bias = (layer.quant_bias.float() + layer.input_offset.float().reshape(()) * m.sum(dim=1)) * deq
        return m, deq / layer.input_scale.float().reshape(()), bias
    offset = getattr(layer, "weight_offset", None)
    if offset is not None:
        m = m - offset.float().reshape(-1, 1)
    return m, layer.weight_scale.float().reshape(-1), None


class MsmodelslimFp8Method(MsmodelslimMethod):
    name = "msmodelslim-fp8"
    kind = "native"
    priority = 1  # outranks msmodelslim-int-mm, measured slower on Hopper

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        m, row_scale, folded_bias = dequantized_linear(self.scheme, layer)
        # the integers themselves go to E4M3 (exact up to 16 in magnitude: all of int4, rounded to 4
        # significant bits beyond), their row scale to the GEMM; the FP8 weight replaces the integer one
        layer.weight.data = m.to(FP8).contiguous()
        layer.register_buffer("_scale_b", row_scale.reshape(1, -1).contiguous(), persistent=False)
        layer.register_buffer("_bias", folded_bias, persistent=False)

    def apply(self, layer, x, bias):
        x2 = x.reshape(-1, x.shape[-1])
        if self.smooth:
            x2 = (x2.float() * layer.mul_scale).to(x.dtype)
        bias = layer._bias.to(x.dtype) if self.scheme == "W8A8" else bias
        if x2.shape[0] <= WEIGHT_ONLY_ROWS:  # modulation rows: FP8 weight widened, 16-bit activations
            y = torch.nn.functional.linear(x2, layer.weight.to(x.dtype)) * layer._scale_b.to(x.dtype)
            y = y if bias is None else y + bias
        else:
            q, s = self._quantize(x2)
            y = torch._scaled_mm(q, layer.weight.t(), scale_a=s, scale_b=layer._scale_b, bias=bias,
                                 out_dtype=x.dtype, use_fast_accum=True)
        return y.reshape(*x.shape[:-1], -1)

    def _quantize(self, x2):
        if not torch.compiler.is_compiling():
            try:
                from diffgen_cuda.fused import kernels
            except ImportError:
                pass
            else:
                return kernels().quant.quant_fp8_per_token(x2, FP8)
        return quantize_fp8_per_token(x2, FP8)


def fp8_unavailable_reason(layer: LayerSpec, platform) -> str | None:
    from diffgen.builtin.fp8_methods import scaled_mm_platform_reason

    if platform.device_kind != "cuda":
        return f"msmodelslim-fp8 runs on NVIDIA GPUs; this device is {platform.device_kind}"
    reason = scaled_mm_platform_reason(platform)
    if reason is None and layer.dtype not in (torch.bfloat16, torch.float16):
        reason = f"msmodelslim-fp8 computes in bf16 or fp16, not {layer.dtype}"
    if reason is None and (layer.in_features % 16 or layer.out_features % 16):
        reason = (f"torch._scaled_mm needs K and N multiples of 16; this layer is "
                  f"{layer.in_features} -> {layer.out_features}")
    return reason
