"""MXFP4 W4A4 on AMD Instinct MI350/MI355X (gfx950) through ROCm's aiter: a thin adapter, not run.

The documented aiter API (github.com/ROCm/aiter), as SGLang-Diffusion's ``--quantization mxfp4``
calls it:
  aiter.utility.fp4_utils.dynamic_mxfp4_quant(x [M, K], shuffle=True)
      -> (codes uint8 [M, K/2], E8M0 scales uint8 [ceil(M/256)*256, ceil(K/256)*8], in the ASM
         kernel's shuffled layout); the "even" scale rule, elements rounded to nearest even
  aiter.ops.shuffle.shuffle_weight(w uint8 [N, K/2], layout=(16, 16)) -> the same bytes tiled
  aiter.ops.gemm_op_a4w4.gemm_a4w4(A, B, A_scale, B_scale, bias=None, dtype=bf16, bpreshuffle=True)
      -> [M padded to 32, N]
Loading keeps diffgen's plain layout (``mxfp4.py``) until ``process_weights_after_loading``, which
shuffles the weight with aiter and lays the E8M0 scales out the way dynamic_mxfp4_quant(shuffle=True)
writes them (``shuffle_e8m0_scales``, plain PyTorch, tested on the CPU). The forward quantizes the
activations with aiter, multiplies, cuts the padding rows and adds the bias in PyTorch.

``import aiter`` happens only on a ROCm gfx950 GPU, inside ``aiter_api``. The PyPI package named
``aiter`` is an unrelated asyncio library: it is told apart by the API above.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from diffgen.linear import QuantLinear
from diffgen.quant import LayerSpec

from .mxfp4 import MIN_OUT_FEATURES, Mxfp4Method

AITER_INSTALL = ("install ROCm's aiter: git clone --recursive https://github.com/ROCm/aiter.git && cd aiter && "
                 "python3 setup.py develop (or use a ROCm vLLM/SGLang image, which ships it); the PyPI package "
                 "named aiter is an unrelated project")
# (module, function) that only ROCm's aiter has
AITER_API = (("aiter.utility.fp4_utils", "dynamic_mxfp4_quant"), ("aiter.ops.shuffle", "shuffle_weight"),
             ("aiter.ops.gemm_op_a4w4", "gemm_a4w4"))
SCALE_ROWS, SCALE_COLS = 256, 8  # the ASM kernel's scale tile: rows padded to 256, columns to 8


def aiter_api() -> tuple[SimpleNamespace | None, str | None]:
    """ROCm's aiter functions, or None and why not (never raises)."""
    try:
        importlib.import_module("aiter")
    except Exception as exc:  # noqa: BLE001 - a broken install fails in any way (missing .so, hipcc)
        return None, f"aiter is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {AITER_INSTALL}"
    found = {}
    for module, function in AITER_API:
        try:
            found[function] = getattr(importlib.import_module(module), function)
        except Exception:  # noqa: BLE001 - ImportError, AttributeError, or the module's own failure
            return None, (f"the installed aiter has no {module}.{function}: it is not ROCm's aiter (the PyPI "
                          f"package aiter is an unrelated asyncio library); {AITER_INSTALL}")
    return SimpleNamespace(**found), None


def aiter_platform_reason(platform) -> str | None:
    """Why aiter's MXFP4 GEMM cannot run on ``platform``, or None."""
    if platform.device_kind != "rocm":
        return f"aiter's MXFP4 GEMM (gemm_a4w4) needs a ROCm GPU of the MI350 series (gfx950); this device is {platform.device_kind}"
    if not (platform.gfx_arch or "").startswith("gfx95"):
        return f"aiter's MXFP4 GEMM (gemm_a4w4) needs gfx950 (MI350/MI355X); this GPU is {platform.gfx_arch or 'unknown'}"
    return aiter_api()[1]


def aiter_unavailable_reason(layer: LayerSpec, platform, scheme: str = "w4a4") -> str | None:
    reason = aiter_platform_reason(platform)
    if reason is None and scheme != "w4a4":
        reason = f"gemm_a4w4 quantizes the activations; the {scheme} scheme keeps them 16-bit"
    if reason is None and layer.out_features < MIN_OUT_FEATURES:
        reason = f"aiter's ASM gemm_a4w4 loses precision below N={MIN_OUT_FEATURES}; {layer.name} has N={layer.out_features}"
    if reason is None and (layer.out_features % 16 or layer.in_features % 64):
        reason = (f"aiter's shuffle_weight needs N divisible by 16 and K by 64; {layer.name} is "
                  f"K={layer.in_features}, N={layer.out_features}")
    if reason is None and layer.dtype not in (torch.bfloat16, torch.float16):
        reason = f"aiter's gemm_a4w4 writes bf16 or fp16; the compute dtype is {layer.dtype}"
    return reason


def shuffle_e8m0_scales(scales: torch.Tensor) -> torch.Tensor:
    """Row-major E8M0 scales [R, C] -> the layout of ``dynamic_mxfp4_quant(shuffle=True)``: padded
    to [ceil(R/256)*256, ceil(C/8)*8] (with 127, a scale of one), each 32 x 8 tile permuted as
    ``view(Rp/32, 2, 16, Cp/8, 2, 4, 1).permute(0, 3, 5, 2, 4, 1, 6)`` (vLLM's Quark path)."""
    rows, cols = scales.shape
    rp, cp = -(-rows // SCALE_ROWS) * SCALE_ROWS, -(-cols // SCALE_COLS) * SCALE_COLS
    padded = torch.full((rp, cp), 127, dtype=torch.uint8, device=scales.device)
    padded[:rows, :cols] = scales.view(torch.uint8)
    tiles = padded.view(rp // 32, 2, 16, cp // 8, 2, 4, 1).permute(0, 3, 5, 2, 4, 1, 6)
    return tiles.contiguous().view(rp, cp)


class AiterMxfp4Method(Mxfp4Method):
    """MXFP4 W4A4 on gfx950: aiter quantizes the activations, gemm_a4w4 multiplies. Adapter, not run."""

    name = "mxfp4-aiter-a4w4"
    kind = "native"

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        api, reason = aiter_api()
        if api is None:
            raise RuntimeError(reason)
        self._api = api
        layer.weight.data = api.shuffle_weight(layer.weight.data, layout=(16, 16))
        layer.weight_scale.data = shuffle_e8m0_scales(layer.weight_scale.data)

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        x_q, x_scale = self._api.dynamic_mxfp4_quant(rows.contiguous(), shuffle=True)
        y = self._api.gemm_a4w4(x_q, layer.weight, x_scale, layer.weight_scale, dtype=x.dtype, bpreshuffle=True)
        y = y[: rows.shape[0]]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
