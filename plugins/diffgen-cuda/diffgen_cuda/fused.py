"""Fused FP8 linear: one-pass Triton activation quantization feeding torch._scaled_mm, and an
FP8-weight GEMV for inputs of a few rows.

Serves the builtin ``fp8`` family (HF fp8 checkpoints, ModelOpt FP8, online ``--quantization
fp8``) for per-tensor and per-channel weight scales; the weights, their layout and the GEMM call
are the builtin method's, only the activation quantization differs:
  static:   q = sat(x * (1 / input_scale))       (one elementwise pass)
  dynamic:  s = amax(|x_row|) / 448, q = sat(x * (1 / s))  (one pass per row, no separate amax pass)
Under torch.compile the PyTorch expressions are used instead, so Inductor can fuse the
quantization into the op that produced x (a norm, a modulation) rather than call an opaque kernel;
except per-token rows wider than WIDE_ROW, which go to the Triton kernel (see there).

Inputs of at most WEIGHT_ONLY_ROWS rows (the modulation linears on the timestep embedding, 76 per
FLUX step) keep 16-bit activations (diffgen.builtin.fp8) and go to kernels/fp8_gemv.py, eager and
compiled (through its operator): one kernel that reads the FP8 weight once for all rows.

The method takes prepared inputs (``diffgen.linear.PreparedInputMethod``): in blocks rewritten
by this plugin (``flux1.py``) the ops before most of these linears, LayerNorm + modulation and GELU
(+ the single block's concat), quantize their output in the same pass (kernels/fp8_producers.py;
bf16 activations only), so the linear gets FP8 directly. Compiled, LayerNorm + modulation is left
to Inductor, which fuses it as well as the kernel does; GELU + concat stays the kernel's, through
its operator.
"""

from __future__ import annotations

import functools
import threading

import torch

from diffgen.builtin.fp8_methods import Fp8ScaledMMMethod, scaled_mm_unavailable_reason
from diffgen.platform import Platform, library
from diffgen.quant import LayerSpec, QuantConfig


def triton_unavailable_reason(platform: Platform) -> str | None:
    if platform.device_kind != "cuda":
        return f"diffgen-cuda's Triton kernels are written for CUDA GPUs; this device is {platform.device_kind}"
    status = library("triton")
    if not status.available:
        return f"Triton is not importable ({status.reason}); pip install triton"
    return None


# Compiled, Inductor quantizes a row inside the kernel that produced it, which is best while the row
# fits one pass. A per-token row wider than this it reduces in a kernel of its own and then reads a
# second time: FLUX's single-block proj_out input (4608 x 15360) took 139 + 137 us per block that
# way on an H100, against 72 us for the per-token kernel. FLUX.1's rewritten blocks quantize that
# row in the GELU + concat producer; other models' wide rows come here.
WIDE_ROW = 8192


class Fp8TritonMethod(Fp8ScaledMMMethod):
    name = "fp8-triton-scaled-mm"
    kind = "native"
    priority = 10  # outranks the builtin method of the same kind: same GEMM, cheaper quantization
    # The kernels' operators, for compiled graphs; set once the weights are processed.
    wide_row_op = None  # per-token quantization
    gelu_concat_op = None  # GELU + concat + quantization
    gemv_op = None  # FP8-weight GEMV for few rows

    def __init__(self, config, layer, **kwargs):
        super().__init__(config, layer, **kwargs)
        # The producers' kernels round intermediates as bf16 ops do, so only for bf16 activations.
        self.prepared_inputs = layer.dtype == torch.bfloat16
        if self.unavailable_reason is None:
            import_kernels_ahead()

    def quantize_static(self, x, scale, dtype):
        if torch.compiler.is_compiling():
            return super().quantize_static(x, scale, dtype)
        return kernels().quant.quant_fp8_static(x, scale, dtype)

    def quantize_per_token(self, x, dtype):
        if torch.compiler.is_compiling():
            if x.shape[-1] > WIDE_ROW and self.wide_row_op is not None:
                return self.wide_row_op(x, dtype)
            return super().quantize_per_token(x, dtype)
        return kernels().quant.quant_fp8_per_token(x, dtype)

    def prepare_norm_modulate(self, layer, x, shift, scale, eps, keep_value):
        if torch.compiler.is_compiling():  # Inductor fuses LayerNorm, modulation and quantization
            return super().prepare_norm_modulate(layer, x, shift, scale, eps, keep_value)
        return kernels().producers.norm_modulate_quant(x, shift, scale, eps, self._static_scale(layer),
                                                       layer.weight.dtype, keep_value)

    def prepare_gelu_concat(self, layer, a, h):
        static_scale = self._static_scale(layer)
        if not torch.compiler.is_compiling():
            return kernels().producers.gelu_concat_quant(a, h, static_scale, layer.weight.dtype)
        if self.gelu_concat_op is None:
            return super().prepare_gelu_concat(layer, a, h)
        # Compiled too: on an H100, FLUX's 4608 x 15360 single-block input took Inductor 111 us static
        # and 240 us per-token against 99 and 100 us for the kernel (benchmarks/fp8_gelu_concat.py).
        q, s = self.gelu_concat_op(a, h, static_scale, layer.weight.dtype)
        return q, static_scale if self.static else s

    def _static_scale(self, layer):
        return layer.input_scale if self.static else None

    def process_weights_after_loading(self, layer):
        super().process_weights_after_loading(layer)
        # Registered by importing the kernels, which must happen outside a compiled region.
        if self.unavailable_reason is None:
            self.wide_row_op = kernels().quant.quant_fp8_per_token_op
            self.gelu_concat_op = kernels().producers.gelu_concat_quant_op
            self.gemv_op = kernels().gemv.fp8_gemv_op

    def apply_weight_only(self, layer, x2, bias):
        if not torch.compiler.is_compiling():
            return kernels().gemv.fp8_gemv(x2, layer.weight, layer.weight_scale, bias)
        if self.gemv_op is None:
            return super().apply_weight_only(layer, x2, bias)
        return self.gemv_op(x2, layer.weight, layer.weight_scale, bias)


@functools.cache
def import_kernels_ahead() -> None:
    """Start importing the Triton modules on a worker thread. Methods are made when a load is
    planned, and the import (Triton's, about a second on an H200) then overlaps the weight reads
    instead of stalling the first layer's processing (``benchmarks/load.py``)."""
    threading.Thread(target=kernels, name="diffgen-cuda-import", daemon=True).start()


@functools.cache
def kernels():
    """The Triton modules, imported on first use (importing them imports Triton)."""
    from types import SimpleNamespace

    from .kernels import fp8_gemv, fp8_producers, fp8_quant, qk_norm_rope

    return SimpleNamespace(quant=fp8_quant, gemv=fp8_gemv, producers=fp8_producers, prologue=qk_norm_rope)


def fp8_triton_unavailable_reason(config: QuantConfig, layer: LayerSpec, platform: Platform) -> str | None:
    """Why Fp8TritonMethod cannot run ``layer`` here, or None."""
    reason = triton_unavailable_reason(platform) or scaled_mm_unavailable_reason(config, layer, platform)
    if reason is None and layer.in_features > 32768:
        reason = f"the per-token kernel keeps a row in registers; K={layer.in_features} > 32768"
    return reason


def offer(config: QuantConfig, layer: LayerSpec, platform: Platform) -> Fp8TritonMethod | None:
    """The fused method for one layer of the fp8 family, with the reason when it cannot run."""
    if config.family != "fp8" or config.scheme_for(layer.name) == "block":
        return None
    return Fp8TritonMethod(config, layer, unavailable_reason=fp8_triton_unavailable_reason(config, layer, platform))
