"""NVFP4 weights on FP8 tensor cores (Ada, Hopper): ``nvfp4-triton-w4a8``.

Per call, one Triton pass (``kernels/w4_gemm.w4_dequantize``) writes the layer's weight as FP8 on
a per-row grid and ``torch._scaled_mm`` multiplies it with per-token FP8 activations:

  row[n]   = max_j weight_scale[n, j] * 6 * weight_scale_2[n] / 448   (every value of the row fits)
  W8[n, k] = e2m1(weight[n, k]) * weight_scale[n, k // 16] * (weight_scale_2[n] / row[n])  -> E4M3
  y        = (q_x * s_x) @ (W8 * row)^T + b

E2M1 x E4M3 products need 5 significant bits and E4M3 keeps 4, so the weight rounds once more
than the format defines; the activations are 8-bit, not the format's 4 (more exact than W4A4).
weight_scale_2 is held per row (``_row_global``) so Q/K/V with different global scales fuse into
one GEMM by concatenation (``fuse``). The method takes prepared inputs
(``diffgen.linear.PreparedInputMethod``) from diffgen-cuda's FP8 producers, per token, so the
rewritten FLUX.1 and Qwen-Image blocks hand it FP8 straight from LayerNorm + modulation and GELU.
Inputs of at most WEIGHT_ONLY_ROWS rows (modulation) keep 16-bit activations and go to the packed GEMV
(``packed4.linear``), which reads the 4-bit weight once and writes no 16-bit copy.
"""

from __future__ import annotations

import torch

from diffgen.builtin.fp8_methods import WEIGHT_ONLY_ROWS
from diffgen.linear import QuantLinear, gelu_concat, norm_modulate
from diffgen.numerics.fp8 import FP8_E4M3_MAX, quantize_fp8_per_token
from diffgen.quant import LayerSpec

from .nvfp4 import (FAMILY, Nvfp4Method, dequantize_rows, register_row_global, w4a16_unavailable_reason,
                    weight_only_linear)

FP8 = torch.float8_e4m3fn


class Nvfp4TritonW4A8Method(Nvfp4Method):
    name = "nvfp4-triton-w4a8"
    kind = "native"
    fold_extras = True
    gelu_concat_op = None  # diffgen-cuda's GELU + concat + FP8 kernel as an operator, for compiled graphs

    def __init__(self, config, layer, **kwargs):
        super().__init__(config, layer, **kwargs)
        self.prepared_inputs = layer.dtype == torch.bfloat16  # the producers round as bf16 ops do

    # Derived per output row, so a split of a loaded layer slices them with the weight's rows
    # (column-parallel) or keeps them whole (row-parallel: the whole K row's scale, under which
    # every value of the rank's slice still fits, so each FP8 weight element is one process's).
    # A tensor-parallel load (diffgen.parallel.tp_load) runs process_weights_after_loading on the
    # rank's slice instead: row-parallel, the row scale then fits the rank's K blocks (a finer
    # grid, not one process's numbers). Either way the activations are quantized per token on the
    # rank's K slice, so row-parallel outputs differ from one process by FP8's rounding.
    tp_derived = {"_row_global": 0, "_w8_scale": 1, "_w8_factor": 0}

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        from . import packed4

        super().process_weights_after_loading(layer)
        global_scale = register_row_global(layer)
        rows = packed4.row_scales(layer.weight_scale.data, global_scale, codes=packed4.E2M1, scales=packed4.E4M3)
        for key, t in zip(("_w8_scale", "_w8_factor", "_one"), rows):
            layer.register_buffer(key, t, persistent=False)
        if self.unavailable_reason is None:
            from .fused import kernels

            self.gelu_concat_op = kernels().producers.gelu_concat_quant_op  # registered outside compiled code

    # -- the GEMMs -------------------------------------------------------------------------
    def apply_prepared(self, layer: QuantLinear, prepared, bias, out_dtype: torch.dtype) -> torch.Tensor:
        q, scale_a = prepared
        return torch._scaled_mm(q, dequantize_rows(layer, FP8, layer._w8_factor).t(), scale_a=scale_a,
                                scale_b=layer._w8_scale, bias=bias, out_dtype=out_dtype, use_fast_accum=True)

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear_smoothed(layer, x, None, bias)

    def linear_smoothed(self, layer: QuantLinear, x: torch.Tensor, smoothing: torch.Tensor | None,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """``linear`` of x * smoothing (None: of x); eager, the per-token quantizer applies it."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= WEIGHT_ONLY_ROWS:
            y = weight_only_linear(layer, x2 if smoothing is None else x2 * smoothing, bias)
        else:
            y = self.apply_prepared(layer, self._quantize(x2, smoothing), bias, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _quantize(self, x2: torch.Tensor, smoothing: torch.Tensor | None = None):
        if smoothing is not None and (torch.compiler.is_compiling() or smoothing.dtype != x2.dtype):
            x2, smoothing = x2 * smoothing, None  # (the kernel's product is rounded to x's dtype)
        if torch.compiler.is_compiling():  # Inductor fuses this into the op that produced x
            return quantize_fp8_per_token(x2, FP8)
        from .fused import kernels

        return kernels().quant.quant_fp8_per_token(x2, FP8, smoothing)

    # -- PreparedInputMethod --------------------------------------------------------------
    def takes_prepared_input(self, layer: QuantLinear, rows: int | None) -> bool:
        # smoothing and the low-rank branch need the 16-bit input (extras.Extras.apply)
        return (self.prepared_inputs and self.unavailable_reason is None and not self.has_extras
                and (rows is None or rows > WEIGHT_ONLY_ROWS))

    def shares_prepared_input(self, layer: QuantLinear, other: QuantLinear) -> bool:
        return type(getattr(other, "method", None)) is type(self)  # per-token FP8 of the same input

    def prepare_norm_modulate(self, layer, x, shift, scale, eps, keep_value):
        if not torch.compiler.is_compiling():
            from .fused import kernels

            return kernels().producers.norm_modulate_quant(x, shift, scale, eps, None, FP8, keep_value)
        y = norm_modulate(x, shift, scale, eps)
        return quantize_fp8_per_token(y.reshape(-1, y.shape[-1]), FP8), y if keep_value else None

    def prepare_gelu_concat(self, layer, a, h):
        if not torch.compiler.is_compiling():
            from .fused import kernels

            return kernels().producers.gelu_concat_quant(a, h, None, FP8)
        if self.gelu_concat_op is not None:
            return self.gelu_concat_op(a, h, None, FP8)
        y = gelu_concat(a, h)
        return quantize_fp8_per_token(y.reshape(-1, y.shape[-1]), FP8)

    # -- fusion (Nvfp4Method.fuse) -----------------------------------------------------------
    row_buffers = ("_row_global", "_w8_scale", "_w8_factor")

    def fused_method(self, spec: LayerSpec) -> "Nvfp4TritonW4A8Method":
        method = super().fused_method(spec)
        method.gelu_concat_op = self.gelu_concat_op
        return method


class Nvfp4TritonW4A8LowrankMethod(Nvfp4TritonW4A8Method):
    """The default for layers with an SVDQuant branch (NVFP4_SVD exports), offered above
    ``nvfp4-triton-w4a8`` there and not offered elsewhere: ``nvfp4-triton-w4a8`` with the branch folded
    into the FP8 weight that its pass writes at every call, instead of two skinny GEMMs and an add per
    call. On an H200, a compiled FLUX.1-dev-sized step with a rank-32 branch and smoothing in every
    layer took 114.4 ms this way against 135.3 with the branch beside the GEMM and bf16's 132.4, and
    came closer to the format's reference (cosine 0.9939 against 0.9930;
    docs/benchmarks/nvfp4_step_svd_lowrank_H200.json):

      total[n, k] = W[n, k] (the format's value, global scale included) + (lora_b @ lora_a)[n, k]
      row[n]      = max_k |total[n, k]| / 448, from the weights, at load
      W8          = E4M3(code * block scale * (global / row) + (lora_b / row) @ lora_a), one pass per call
      y           = (q(x * s) * s_x) @ (W8 * row)^T + b

    (``kernels/w4_gemm.w4_dequantize_lowrank``; the branch's rank padded with zeros to a power of two
    of at least 16 for the tensor cores.) The branch is rounded to FP8 with the weight, where the
    format keeps it 16-bit: the definition to within E4M3's rounding of each row's sum. Inputs of a
    few rows (modulation) take the folded extras instead (``extras.Extras``)."""

    name = "nvfp4-triton-w4a8-lowrank"
    priority = 1  # above nvfp4-triton-w4a8, on the layers it is offered for

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        if self.rank:
            fold_lowrank_rows(layer)

    def fuse(self, layers: list[QuantLinear], name: str) -> QuantLinear | None:
        fused = super().fuse(layers, name)  # the parts share lora_a (and the smoothing) or do not fuse
        if fused is not None and self.rank:
            fused.register_buffer("_lowrank_b", torch.cat([layer._lowrank_b for layer in layers]), persistent=False)
            fused.register_buffer("_lowrank_a", layers[0]._lowrank_a, persistent=False)
        return fused

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.rank or x.numel() // max(x.shape[-1], 1) <= WEIGHT_ONLY_ROWS:
            return super().apply(layer, x, bias)
        return self.linear_smoothed(layer, x, layer.pre_quant_scale if self.smoothed else None, bias)

    def apply_prepared(self, layer: QuantLinear, prepared, bias, out_dtype: torch.dtype) -> torch.Tensor:
        if not self.rank:
            return super().apply_prepared(layer, prepared, bias, out_dtype)
        q, scale_a = prepared
        return torch._scaled_mm(q, lowrank_rows(layer).t(), scale_a=scale_a, scale_b=layer._w8_scale, bias=bias,
                                out_dtype=out_dtype, use_fast_accum=True)


def fold_lowrank_rows(layer: QuantLinear) -> None:
    """The row grid of weight + branch (``_w8_scale``, ``_w8_factor``) and the padded branch on it
    (``_lowrank_b`` [N, R], ``_lowrank_a`` [R, K]), from the layer's tensors, once."""
    from diffgen.numerics.nvfp4 import dequantize_nvfp4

    b, a = layer.svdquant_lora_b.data, layer.svdquant_lora_a.data
    one = torch.ones((), device=layer.weight.device)
    total = (dequantize_nvfp4(layer.weight.data, layer.weight_scale.data, one, k=layer.in_features)
             * layer._row_global[:, None] + b.float() @ a.float())
    row = total.abs().amax(dim=1) * (1.0 / FP8_E4M3_MAX)
    row = torch.where(row > 0, row, torch.ones_like(row))
    rank = max(16, 1 << (a.shape[0] - 1).bit_length())
    padded_b = torch.zeros((b.shape[0], rank), dtype=a.dtype, device=b.device)
    padded_b[:, :b.shape[1]] = (b.float() / row[:, None]).to(a.dtype)
    padded_a = torch.zeros((rank, a.shape[1]), dtype=a.dtype, device=a.device)
    padded_a[:a.shape[0]] = a
    for key, t in (("_w8_scale", row.reshape(1, -1).contiguous()), ("_w8_factor", (layer._row_global / row).contiguous()),
                   ("_lowrank_b", padded_b), ("_lowrank_a", padded_a)):
        layer.register_buffer(key, t, persistent=False)


def lowrank_rows(layer: QuantLinear) -> torch.Tensor:
    """The layer's FP8 weight with its branch on the row grid (``fold_lowrank_rows``), by one pass."""
    from .kernels import w4_gemm

    args = (layer.weight, layer.weight_scale, layer.in_features, layer._w8_factor, layer._lowrank_b, layer._lowrank_a)
    if torch.compiler.is_compiling():
        return w4_gemm.w4_dequantize_lowrank_op(*args)
    return w4_gemm.w4_dequantize_lowrank(*args)


def lowrank_rows_reference(layer: QuantLinear) -> torch.Tensor:
    """What ``lowrank_rows`` writes, in PyTorch (any device): the same sum, clamped, cast to E4M3."""
    from diffgen.numerics.nvfp4 import dequantize_nvfp4

    one = torch.ones((), device=layer.weight.device)
    w = dequantize_nvfp4(layer.weight, layer.weight_scale, one, k=layer.in_features) * layer._w8_factor[:, None]
    w = w + layer._lowrank_b.float() @ layer._lowrank_a.float()
    return w.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)


def w4a8_unavailable_reason(layer: LayerSpec, platform) -> str | None:
    from diffgen.builtin.fp8_methods import scaled_mm_platform_reason

    reason = w4a16_unavailable_reason(layer, platform) or scaled_mm_platform_reason(platform)
    if reason is None and (layer.in_features % 16 or layer.out_features % 16):
        reason = f"torch._scaled_mm needs K and N multiples of 16; this layer is {layer.in_features} -> {layer.out_features}"
    return reason


def offer(config, layer: LayerSpec, platform) -> list[Nvfp4TritonW4A8Method]:
    if config.family != FAMILY:
        return []
    reason = w4a8_unavailable_reason(layer, platform)
    offers = [Nvfp4TritonW4A8Method(config, layer, unavailable_reason=reason)]
    lowrank = Nvfp4TritonW4A8LowrankMethod(config, layer, unavailable_reason=reason)
    if lowrank.rank:  # only a layer with an SVDQuant branch has anything to fold
        offers.append(lowrank)
    return offers
