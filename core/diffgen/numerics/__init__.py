"""Bit-level number formats shared by the quantization plugins: FP8, E2M1, E8M0 (MX), int4."""

from .e2m1 import (
    E2M1_MAX,
    E2M1_VALUES,
    e2m1_to_float,
    float_to_e2m1,
    pack_e2m1,
    swap_nibbles,
    unpack_e2m1,
)
from .e8m0 import (
    dequantize_mx,
    e8m0_to_float,
    float_to_e8m0_floor,
    mx_shared_exponent_scale,
    quantize_mx,
)
from .fp8 import (
    FP8_E4M3_MAX,
    FP8_E5M2_MAX,
    decode_e4m3fn_bits,
    decode_e5m2_bits,
    dequantize_fp8,
    dequantize_fp8_block,
    fp8_e4m3fn_to_e4m3fnuz,
    fp8_max,
    per_channel_scale,
    per_tensor_scale,
    quantize_fp8,
    quantize_fp8_block,
    quantize_fp8_per_token,
)
from .int4 import pack_int4, unpack_int4

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "FP8_E4M3_MAX",
    "FP8_E5M2_MAX",
    "decode_e4m3fn_bits",
    "decode_e5m2_bits",
    "dequantize_fp8",
    "dequantize_fp8_block",
    "dequantize_mx",
    "e2m1_to_float",
    "e8m0_to_float",
    "float_to_e2m1",
    "float_to_e8m0_floor",
    "fp8_e4m3fn_to_e4m3fnuz",
    "fp8_max",
    "mx_shared_exponent_scale",
    "pack_e2m1",
    "pack_int4",
    "per_channel_scale",
    "per_tensor_scale",
    "quantize_fp8",
    "quantize_fp8_block",
    "quantize_fp8_per_token",
    "quantize_mx",
    "swap_nibbles",
    "unpack_e2m1",
    "unpack_int4",
]
