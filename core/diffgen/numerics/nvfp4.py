"""NVFP4: E2M1 elements in blocks of 16 along K, an E4M3 scale per block, an FP32 global scale.

Per weight [N, K] (K padded up to a multiple of 16 before quantizing, as ModelOpt does):
  packed       uint8 [N, Kp/2]    two E2M1 codes per byte, element 2i in the low nibble
  block_scale  float8_e4m3fn [N, Kp/16]   row-major ("linear"); kernels want it 128x4-swizzled
  global_scale fp32 ()            a dequant multiplier: ModelOpt's weight_scale_2 = amax / (6 * 448)
Dequant: w[n, k] = e2m1(code[n, k]) * float(block_scale[n, k // 16]) * global_scale.
Quant:   s = e4m3(clamp(block_amax / (6 * global_scale), 2^-9, 448)) (1 where the block is zero),
         code = round_to_nearest_even_e2m1(w / (s * global_scale)).
Activations (W4A4) are quantized the same way at run time, block by block along K, with the
checkpoint's static ``input_scale`` (amax / (6 * 448) of calibration) as their global scale.
"""

from __future__ import annotations

import torch

from .e2m1 import E2M1_MAX, e2m1_to_float, float_to_e2m1, pack_e2m1, unpack_e2m1
from .fp8 import FP8_E4M3_MAX

BLOCK = 16
_MIN_BLOCK_SCALE = 2.0 ** -9  # the smallest E4M3 subnormal; ModelOpt clamps block scales to it


def global_scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The FP32 global (dequant) scale that maps ``amax`` onto 6 * 448."""
    return (amax.float() / (E2M1_MAX * FP8_E4M3_MAX)).reshape(())


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., Kp/16, 16], zero-padded along K."""
    pad = -x.shape[-1] % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [..., K] -> (packed uint8 [..., Kp/2], block scales e4m3 [..., Kp/16], global scale)."""
    x = x.float()
    if global_scale is None:
        global_scale = global_scale_of(x.abs().amax())
    global_scale = global_scale.float().reshape(())
    blocks = _blocks(x)
    amax = blocks.abs().amax(dim=-1)
    scale = (amax / (E2M1_MAX * global_scale)).clamp(_MIN_BLOCK_SCALE, FP8_E4M3_MAX)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale).to(torch.float8_e4m3fn)
    codes = float_to_e2m1(blocks / (scale.float()[..., None] * global_scale))
    return pack_e2m1(codes.reshape(*x.shape[:-1], -1)), scale, global_scale


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     k: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition above; ``k`` cuts the padding off (default: all Kp columns)."""
    values = e2m1_to_float(unpack_e2m1(packed))
    values = values.reshape(*values.shape[:-1], -1, BLOCK) * block_scale.float()[..., None]
    out = values.reshape(*values.shape[:-2], -1) * global_scale.float()
    return (out if k is None else out[..., :k]).to(dtype)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to NVFP4 and back, block by block along its last dim (W4A4 activations)."""
    packed, scale, g = quantize_nvfp4(x, global_scale)
    return dequantize_nvfp4(packed, scale, g, k=x.shape[-1], dtype=x.dtype)


def linear_to_swizzled_scales(scale: torch.Tensor) -> torch.Tensor:
    """Row-major block scales [M, C] -> the 128x4-tiled layout cuBLAS, CUTLASS and FlashInfer read:
    rows padded to 128 and columns to 4; row r = 128i + 32j + t, column c = 4l + m lands in tile
    (i, l) at offset 16t + 4j + m. Returns [Mp, Cp] holding that byte order."""
    m, c = scale.shape
    padded = torch.zeros(-(-m // 128) * 128, -(-c // 4) * 4, dtype=scale.dtype, device=scale.device)
    padded[:m, :c] = scale
    mp, cp = padded.shape
    tiles = padded.reshape(mp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, cp)


def swizzled_to_linear_scales(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`linear_to_swizzled_scales`, cut to ``rows`` x ``cols``."""
    mp, cp = scale.shape
    tiles = scale.reshape(mp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, cp)[:rows, :cols]
