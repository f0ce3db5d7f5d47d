"""MXFP4 on NVIDIA GPUs: diffgen-cuda's packed 4-bit weight path (``diffgen_cuda.packed4``).

The stored layout is already packed4's: weight uint8 [N, Kp/2] (E2M1, low nibble first), scale
uint8 [N, Kp/32] (E8M0), with a global scale of one. At each call one Triton pass writes the
layer's 16-bit weight, cuBLAS multiplies and the copy is dropped: W4A16, so the activations stay
16-bit (more exact than the W4A4 definition; the ``w4a4`` scheme's activation rounding is skipped).
On Hopper (no FP4 tensor cores) this is how ``--quantization mxfp4`` and Quark MXFP4 checkpoints
run on an H100/H200. ``mxfp4-packed4-w4a8`` (native, SM89+) runs the same weights on FP8 tensor
cores instead (``packed4.linear_fp8``: the weight on a per-row FP8 grid, activations per token;
8-bit activations, still more exact than the W4A4 definition). diffgen-cuda is imported lazily;
without it the offer says how to get it.
"""

from __future__ import annotations

import torch

from diffgen.linear import QuantLinear
from diffgen.quant import LayerSpec

from .mxfp4 import GROUP, Mxfp4Method

NEEDS_DIFFGEN_CUDA = "needs diffgen-cuda: pip install diffgen[cuda]"


def packed4_unavailable_reason(layer: LayerSpec, platform, fp8: bool = False) -> str | None:
    try:
        from diffgen_cuda import packed4
    except ImportError:
        return NEEDS_DIFFGEN_CUDA
    reason = packed4.fp8_unavailable_reason if fp8 else packed4.unavailable_reason
    return reason(layer, platform, scales=packed4.E8M0)


class Mxfp4Packed4Method(Mxfp4Method):
    """Weight-only MXFP4 through ``diffgen_cuda.packed4.linear`` (E2M1 codes, E8M0 scales per 32)."""

    name = "mxfp4-packed4"
    kind = "weight-only"
    tp_derived: dict[str, int] = {}  # the global scale below is one number, the same on every rank

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        layer.weight_scale.data = layer.weight_scale.data.view(torch.uint8).contiguous()
        layer.register_buffer("_global_scale", torch.ones((), dtype=torch.float32, device=layer.weight.device),
                              persistent=False)

    def packed4_arguments(self, layer: QuantLinear) -> dict:
        """What ``apply`` hands to packed4 besides the input and bias (tested on the CPU)."""
        return dict(weight=layer.weight, scale=layer.weight_scale, global_scale=layer._global_scale,
                    in_features=layer.in_features, group=GROUP)

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from diffgen_cuda import packed4

        a = self.packed4_arguments(layer)
        return packed4.linear(x, a["weight"], a["scale"], a["global_scale"], bias, a["in_features"],
                              codes=packed4.E2M1, scales=packed4.E8M0, group=a["group"])


class Mxfp4Packed4W4A8Method(Mxfp4Packed4Method):
    """MXFP4 weights on FP8 tensor cores through ``diffgen_cuda.packed4.linear_fp8``; inputs of at
    most four rows (modulation) take the weight-only path."""

    name = "mxfp4-packed4-w4a8"
    kind = "native"
    # The per-row FP8 scales follow the rows; row-parallel they stay the whole row's (every value
    # of the rank's K slice fits under them; each FP8 weight element is one process's).
    tp_derived = {"_row_scale": 1, "_row_factor": 0}

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        from diffgen_cuda import packed4

        super().process_weights_after_loading(layer)
        rows = packed4.row_scales(layer.weight_scale, layer._global_scale, codes=packed4.E2M1, scales=packed4.E8M0)
        for key, t in zip(("_row_scale", "_row_factor", "_one"), rows):
            layer.register_buffer(key, t, persistent=False)

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from diffgen_cuda import packed4

        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= 4:
            return super().apply(layer, x, bias)
        y = packed4.linear_fp8(x2, layer.weight, layer.weight_scale, (layer._row_scale, layer._row_factor, layer._one),
                               bias, layer.in_features, codes=packed4.E2M1, scales=packed4.E8M0, group=GROUP)
        return y.reshape(*x.shape[:-1], -1)
