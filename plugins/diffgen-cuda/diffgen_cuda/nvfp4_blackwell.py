"""NVFP4 on Blackwell FP4 tensor cores (SM100/103/110/120/121): a thin adapter over
``torch._scaled_mm`` with ``float4_e2m1fn_x2`` operands and FlashInfer's ``mm_fp4``.

NOT RUN: no Blackwell GPU has been available to this project. What is tested, on the CPU, is
everything up to the call: the weight and activation operands and scales prepared as the APIs
document, then multiplied back out in PyTorch against the reference method.
- Operands: packed E2M1 bytes, rows of the weight padded to a multiple of 32 and K to a multiple
  of 32 elements (CUTLASS and FlashInfer need both); activations quantized per 16-block with
  1 / input_scale as their global quantize multiplier (FlashInfer's ``a_global_sf``).
- Block scales: E4M3 in the 128x4-tiled layout (``linear_to_swizzled_scales``), which both
  ``_scaled_mm`` (BlockWise1x16) and ``mm_fp4`` (``SfLayout.layout_128x4``) read.
- The GEMMs apply one level of scales; the global ones come back as
  alpha = input_scale * weight_scale_2, multiplied into the output (``_scaled_mm``) or passed as
  ``alpha`` (``mm_fp4``).
Backend: ``DIFFGEN_FP4_GEMM_BACKEND`` = auto | cudnn | cutlass | trtllm | torch (SGLang's
``SGLANG_DIFFUSION_FLASHINFER_FP4_GEMM_BACKEND`` is read when ours is unset; its ``flashinfer_``
prefixes are accepted). auto takes FlashInfer's own choice when FlashInfer imports, else
``torch._scaled_mm``. trtllm needs weights shuffled for its layout, which this adapter does not do
yet: it is refused with that reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear
from diffgen.numerics.nvfp4 import BLOCK, linear_to_swizzled_scales, quantize_nvfp4

from .nvfp4 import Nvfp4Method

ENV, SGLANG_ENV = "DIFFGEN_FP4_GEMM_BACKEND", "SGLANG_DIFFUSION_FLASHINFER_FP4_GEMM_BACKEND"
BACKENDS = ("auto", "cudnn", "cutlass", "trtllm", "torch")
BLACKWELL = {(10, 0), (10, 3), (11, 0), (12, 0), (12, 1)}
ALIGN = 32  # CUTLASS / FlashInfer FP4: N and K multiples of 32


def fp4_gemm_backend() -> str:
    name = os.environ.get(ENV) or os.environ.get(SGLANG_ENV) or "auto"
    name = name.strip().lower().removeprefix("flashinfer_")
    if name not in BACKENDS:
        raise DiffgenError(f"{ENV}={name!r} is not an FP4 GEMM backend; use one of {', '.join(BACKENDS)}")
    return name


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass
class Fp4Operand:
    """One operand as the FP4 GEMMs take it: ``packed`` uint8 [rows, Kp/2] (rows and Kp padded to
    32), ``scale`` E4M3 [rows padded to 128, Kp/16 padded to 4] in the 128x4-tiled layout."""

    packed: torch.Tensor
    scale: torch.Tensor
    rows: int


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(rows, cols, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def prepare_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> Fp4Operand:
    """The checkpoint's packed weight [N, Kp/2] and row-major block scales [N, Kp/16], padded and tiled."""
    n = weight.shape[0]
    kp = _round_up(2 * weight.shape[1], ALIGN)
    packed = _pad(weight, _round_up(n, ALIGN), kp // 2)
    scale = _pad(weight_scale.view(torch.uint8), packed.shape[0], kp // BLOCK).view(torch.float8_e4m3fn)
    return Fp4Operand(packed, linear_to_swizzled_scales(scale), n)


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor) -> Fp4Operand:
    """x [M, K] in NVFP4 with ``input_scale`` as its global dequant scale, padded and tiled (what
    FlashInfer's ``nvfp4_quantize(x, 1 / input_scale, layout_128x4)`` returns, done in PyTorch)."""
    m, k = x.shape
    kp = _round_up(k, ALIGN)
    packed, scale, _ = quantize_nvfp4(torch.nn.functional.pad(x.float(), (0, kp - k)), input_scale)
    return Fp4Operand(packed, linear_to_swizzled_scales(scale), m)


def alpha(input_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    return (input_scale.float() * weight_scale_2.float()).reshape(())


def scaled_mm(a: Fp4Operand, b: Fp4Operand, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._scaled_mm`` with BlockWise1x16 scales; a row-major, b column-major (its transpose)."""
    fp4 = torch.float4_e2m1fn_x2
    out = torch._scaled_mm(a.packed.view(fp4), b.packed.view(fp4).t(), scale_a=a.scale.reshape(-1),
                           scale_b=b.scale.reshape(-1), out_dtype=out_dtype)
    return (out[: a.rows, : b.rows].float() * scale).to(out_dtype)


def flashinfer_mm(x: torch.Tensor, input_scale: torch.Tensor, b: Fp4Operand, scale: torch.Tensor, backend: str,
                  out_dtype: torch.dtype) -> torch.Tensor:
    import flashinfer

    kp = 2 * b.packed.shape[1]
    x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
    xq, xs = flashinfer.nvfp4_quantize(x, (1.0 / input_scale.float()).reshape(()),
                                       sfLayout=flashinfer.SfLayout.layout_128x4, do_shuffle=False)
    out = flashinfer.mm_fp4(xq, b.packed.t(), xs, b.scale.t(), scale, out_dtype=out_dtype, block_size=16,
                            backend=backend)
    return out[:, : b.rows]


def blackwell_unavailable_reason(layer, platform, scheme: str) -> str | None:
    if platform.device_kind != "cuda" or platform.capability not in BLACKWELL:
        where = f"SM{platform.capability[0]}{platform.capability[1]}" if platform.capability else platform.device_kind
        return f"FP4 tensor cores are Blackwell's (SM100, SM103, SM110, SM120, SM121); this device is {where}"
    if scheme != "w4a4":
        return "NVFP4 x NVFP4 only: W4A16 (FlashInfer mm_bf16_fp4) is not wrapped yet"
    if not hasattr(torch, "float4_e2m1fn_x2"):
        return f"torch {torch.__version__} has no float4_e2m1fn_x2; FP4 _scaled_mm needs torch >= 2.8"
    try:
        backend = fp4_gemm_backend()
    except DiffgenError as exc:
        return str(exc)
    if backend == "trtllm":
        return "the trtllm backend needs weights shuffled for its layout, which this adapter does not do yet"
    if backend in ("cudnn", "cutlass") and not platform.library("flashinfer").available:
        return f"{ENV}={backend} needs FlashInfer (pip install flashinfer-python flashinfer-cubin)"
    return None


class Nvfp4BlackwellMethod(Nvfp4Method):
    name = "nvfp4-blackwell-fp4-gemm"
    kind = "native"

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        layer.fp4_weight = prepare_weight(layer.weight.data, layer.weight_scale.data)
        layer.fp4_alpha = alpha(layer.input_scale.data, layer.weight_scale_2.data)

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        backend = fp4_gemm_backend()
        if backend == "torch" or (backend == "auto" and not _flashinfer_imports()):
            y = scaled_mm(quantize_activations(rows, layer.input_scale), layer.fp4_weight, layer.fp4_alpha, x.dtype)
        else:
            y = flashinfer_mm(rows, layer.input_scale, layer.fp4_weight, layer.fp4_alpha, backend, x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def offer(config, layer, platform) -> list[Nvfp4BlackwellMethod]:
    scheme = config.scheme_for(layer.name) or "w4a4"
    return [Nvfp4BlackwellMethod(config, layer, unavailable_reason=blackwell_unavailable_reason(layer, platform, scheme))]


def _flashinfer_imports() -> bool:
    from diffgen.platform import library

    return library("flashinfer").available
