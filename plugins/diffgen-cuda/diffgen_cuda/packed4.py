"""Packed 4-bit weights on NVIDIA GPUs, for any format plugin: the public face of
``kernels.w4_gemm``.

A format that stores 4-bit weights with one scale per group (NVFP4, MXFP4, SVDQuant int4,
msmodelslim MXFP4) converts its tensors once, in ``process_weights_after_loading``, to:
  weight        uint8 [N, Kp/2]      two codes per byte along K, element 2i in the low nibble
                                     (``numerics.e2m1.pack_e2m1`` / ``numerics.int4.pack_int4``)
  scale         [N, Kp/group]        uint8 E8M0 exponents, float8_e4m3fn, or a 16/32-bit float
  global_scale  fp32 ()              a multiplier for the whole weight (ones when there is none)
with Kp the input width padded to a multiple of ``group`` (16, 32 or 64), and calls ``linear``:
W = code(weight) * scale * global_scale is written in 16-bit by one bandwidth-bound Triton pass,
multiplied by cuBLAS, and dropped (with ``chunk_bytes``, chunk of output rows by chunk); an input of
a few rows (a modulation linear) instead meets the packed weight in one GEMV kernel that reads it
once. Or, on FP8 tensor cores (SM89+), ``linear_fp8`` with the ``row_scales`` prepared once: the
pass writes W on a per-row FP8 grid (row = the row's largest |code| * scale * global / 448, so every
value fits; the product of a 4-bit code and its scale needs more than E4M3's 4 significant bits, so
W rounds once more), the activations are quantized per token, and ``torch._scaled_mm`` multiplies. This module imports nothing heavy; Triton is imported
at the first call. Other plugins import it lazily and say "needs diffgen-cuda" when it is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffgen.numerics.fp8 import FP8_E4M3_MAX, quantize_fp8_per_token
from diffgen.quant import LayerSpec

E2M1, INT4 = 0, 1  # codes: FP4 (sign, 2 exponent bits, 1 mantissa bit) or two's-complement int4
E4M3, E8M0, FLOAT = 0, 1, 2  # scales
GROUPS = (16, 32, 64)
FP8 = torch.float8_e4m3fn
_CODE_MAX = {E2M1: 6.0, INT4: 8.0}  # the largest |value| of a code
_SCALE_DTYPES = {E4M3: (torch.float8_e4m3fn,), E8M0: (torch.uint8,),
                 FLOAT: (torch.bfloat16, torch.float16, torch.float32)}


def unavailable_reason(layer: LayerSpec, platform, *, scales: int) -> str | None:
    """None when the kernels can run ``layer`` on ``platform``; else why not, in words."""
    from .fused import triton_unavailable_reason

    reason = triton_unavailable_reason(platform)
    capability = platform.capability or (0, 0)
    if reason is None and capability < (8, 0):
        reason = f"the 4-bit Triton kernels need SM80+; this GPU is SM{capability[0]}{capability[1]}"
    if reason is None and scales == E4M3 and capability < (8, 9):
        reason = (f"the kernel reads E4M3 block scales, which Triton converts on SM89+; this GPU is "
                  f"SM{capability[0]}{capability[1]}")
    if reason is None and layer.dtype not in (torch.bfloat16, torch.float16):
        reason = f"the kernel multiplies bf16 or fp16 activations, not {layer.dtype}"
    return reason


def _check(weight: torch.Tensor, scale: torch.Tensor, in_features: int, codes: int, scales: int, group: int) -> None:
    if codes not in (E2M1, INT4) or group not in GROUPS or scale.dtype not in _SCALE_DTYPES.get(scales, ()):
        raise ValueError(f"packed4: codes={codes}, scales={scales} ({scale.dtype}), group={group} is not a "
                         f"supported combination (groups {GROUPS})")
    kp = 2 * weight.shape[1]
    expected_scale = (weight.shape[0], kp // group)
    if weight.dtype != torch.uint8 or kp % group or kp < in_features or tuple(scale.shape) != expected_scale:
        raise ValueError(f"packed4: weight {weight.dtype} {tuple(weight.shape)} with scale {tuple(scale.shape)} "
                         f"is not the packed layout for {in_features} inputs in groups of {group}")


def dequantize(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, in_features: int,
               dtype: torch.dtype, *, codes: int, scales: int, group: int,
               row_factor: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, in_features] weight in ``dtype`` (each row times ``row_factor`` [N] where given);
    an operator of its own under torch.compile."""
    from .kernels import w4_gemm

    if not torch.compiler.is_compiling() or w4_gemm.w4_dequantize_op is None:  # (None: torch < 2.6)
        _check(weight, scale, in_features, codes, scales, group)
        return w4_gemm.w4_dequantize(weight, scale, global_scale, in_features, dtype, row_factor,
                                     codes=codes, scales=scales, group=group)
    return w4_gemm.w4_dequantize_op(weight, scale, global_scale, in_features, dtype, row_factor, codes, scales,
                                    group)


MIN_CHUNK_ROWS = 2048  # a narrower GEMM of FLUX.1's 4,608 tokens fills too few of an H200's SMs


def chunk_rows(out_features: int, in_features: int, chunk_bytes: int | None) -> int | None:
    """Output rows per chunk of a chunked weight-only GEMM (``linear``'s ``chunk_bytes``): the most
    rows, a multiple of 256, whose 16-bit weight fits in ``chunk_bytes``; None (one pass, one GEMM)
    when that is under MIN_CHUNK_ROWS or covers the whole layer."""
    if chunk_bytes is None:
        return None
    rows = chunk_bytes // (2 * in_features) // 256 * 256
    return rows if MIN_CHUNK_ROWS <= rows < out_features else None


def _chunked_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                    row_factor: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, rows: int,
                    codes: int, scales: int, group: int) -> torch.Tensor:
    """x [M, K] @ W^T + b, ``rows`` output rows at a time: each chunk's 16-bit weight is written by
    the pass and read at once by its GEMM, which writes its columns of the one output."""
    from .kernels import w4_gemm

    n = weight.shape[0]
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for n0 in range(0, n, rows):
        part = slice(n0, min(n, n0 + rows))
        w = w4_gemm.w4_dequantize(weight[part], scale[part], global_scale, in_features, x.dtype,
                                  None if row_factor is None else row_factor[part], codes=codes, scales=scales,
                                  group=group)
        if bias is None:
            torch.mm(x, w.t(), out=y[:, part])
        else:
            torch.addmm(bias[part], x, w.t(), out=y[:, part])
    return y


# One operator under torch.compile: the graph calls the eager loop, whose GEMMs write the output's
# column slices in place (a traced loop would concatenate copies).
@torch.library.custom_op("diffgen_cuda::packed4_chunked_linear", mutates_args=())
def chunked_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                      row_factor: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, rows: int,
                      codes: int, scales: int, group: int) -> torch.Tensor:
    return _chunked_linear(x, weight, scale, global_scale, row_factor, bias, in_features, rows, codes, scales, group)


@chunked_linear_op.register_fake
def _(x, weight, scale, global_scale, row_factor, bias, in_features, rows, codes, scales, group):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
           bias: torch.Tensor | None, in_features: int, *, codes: int, scales: int, group: int,
           row_factor: torch.Tensor | None = None, chunk_bytes: int | None = None) -> torch.Tensor:
    """Weight-only: y = x @ W^T + b in x's dtype, W's rows times ``row_factor`` [N] where given.
    An input of at most ``GEMV_ROWS`` rows (a modulation linear's one row per sample) goes to
    ``w4_gemv``, which reads the packed weight once; more rows, to the pass and cuBLAS: the whole
    layer at once, or with ``chunk_bytes`` a chunk of output rows of at most that many 16-bit bytes
    at a time (``chunk_rows``), so each chunk's weight can still be in L2 when its GEMM reads it."""
    from .kernels import w4_gemm

    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > w4_gemm.GEMV_ROWS:
        rows = chunk_rows(weight.shape[0], in_features, chunk_bytes)
        if rows is None:
            w = dequantize(weight, scale, global_scale, in_features, x.dtype, codes=codes, scales=scales,
                           group=group, row_factor=row_factor)
            return F.linear(x, w, bias)
        if torch.compiler.is_compiling():
            y = chunked_linear_op(x2, weight, scale, global_scale, row_factor, bias, in_features, rows, codes,
                                  scales, group)
        else:
            _check(weight, scale, in_features, codes, scales, group)
            y = _chunked_linear(x2, weight, scale, global_scale, row_factor, bias, in_features, rows, codes, scales,
                                group)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if torch.compiler.is_compiling():
        y = w4_gemm.w4_gemv_op(x2, weight, scale, global_scale, row_factor, bias, codes, scales, group)
    else:
        _check(weight, scale, in_features, codes, scales, group)
        if x2.shape[1] != in_features:
            raise ValueError(f"packed4: input of {x2.shape[1]} features for a layer of {in_features}")
        y = w4_gemm.w4_gemv(x2, weight, scale, global_scale, row_factor, bias, codes=codes, scales=scales,
                            group=group)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fp8_unavailable_reason(layer: LayerSpec, platform, *, scales: int) -> str | None:
    """``unavailable_reason``, and what ``linear_fp8``'s torch._scaled_mm needs on top."""
    from diffgen.builtin.fp8_methods import scaled_mm_platform_reason

    reason = unavailable_reason(layer, platform, scales=scales) or scaled_mm_platform_reason(platform)
    if reason is None and (layer.in_features % 16 or layer.out_features % 16):
        reason = (f"torch._scaled_mm needs K and N multiples of 16; this layer is "
                  f"{layer.in_features} -> {layer.out_features}")
    return reason


def _scale_values(scale: torch.Tensor, scales: int) -> torch.Tensor:
    if scales == E8M0:
        return torch.exp2(scale.float() - 127)
    return scale.float()


def row_scales(scale: torch.Tensor, global_scale: torch.Tensor, *, codes: int, scales: int,
               channel_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale_b [1, N], factor [N], one ()) for ``linear_fp8``, computed once per layer: the row
    scale the GEMM multiplies back (times ``channel_scale`` [N] where the format scales output
    channels), the factor the dequantize pass multiplies each row by (global / row), and a 1."""
    global_scale = global_scale.float().reshape(-1)
    row = _scale_values(scale, scales).amax(dim=1) * _CODE_MAX[codes] * global_scale / FP8_E4M3_MAX
    row = torch.where(row > 0, row, torch.ones_like(row))
    scale_b = row if channel_scale is None else row * channel_scale.float().reshape(-1)
    return (scale_b.reshape(1, -1).contiguous(), (global_scale / row).contiguous(),
            torch.ones((), device=scale.device))


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rows, bias: torch.Tensor | None,
               in_features: int, *, codes: int, scales: int, group: int) -> torch.Tensor:
    """W4A8: y = x @ W^T + b in x's dtype, on FP8 tensor cores; ``rows`` from ``row_scales``.
    ``x`` is 2-D [M, K]."""
    from .fused import kernels
    from .kernels import w4_gemm

    scale_b, factor, one = rows
    if torch.compiler.is_compiling():  # Inductor fuses the activation quantization into x's producer
        q, s = quantize_fp8_per_token(x, FP8)
        w8 = w4_gemm.w4_dequantize_op(weight, scale, one, in_features, FP8, factor, codes, scales, group)
    else:
        _check(weight, scale, in_features, codes, scales, group)
        q, s = kernels().quant.quant_fp8_per_token(x, FP8)
        w8 = w4_gemm.w4_dequantize(weight, scale, one, in_features, FP8, factor, codes=codes, scales=scales,
                                   group=group)
    return torch._scaled_mm(q, w8.t(), scale_a=s, scale_b=scale_b, bias=bias, out_dtype=x.dtype,
                            use_fast_accum=True)
