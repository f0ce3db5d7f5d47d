"""A stand-in for the torch_npu ops the adapters call, written from their documentation
(op-plugin's op_plugin_functions.yaml and custom_APIs docs; reference/ascend_rocm_formats.md 3),
in plain PyTorch on the CPU. It imports nothing from diffgen_ascend. Layout conventions it
checks: int8 weights [K, N]; int4 packed 8 per int32 along the last dim (low nibble first);
MX scales [M, K/64, 2] for activations and [K/64, N, 2] for weights; FP4 weights as the
transposed view [K/2, N] of [N, K/2]; dual-level weights [N, K/2] with level-1 scales
[N, K/64, 2] and level-0 scales [K/512, N]."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from msmodelslim_writer import e2m1_codes, e2m1_value, e4m3_round, log2_floor

float8_e8m0fnu = 293
float4_e2m1fn_x2 = 296
calls: list[str] = []


def _e8m0(b: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, b.double() - 127)


def _unpair(scale: torch.Tensor) -> torch.Tensor:
    """[R, K/64, 2] -> [R, K/32]."""
    return scale.reshape(scale.shape[0], -1)


def _unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    codes = torch.stack((packed & 15, packed >> 4), -1).reshape(packed.shape[0], -1)
    return e2m1_value(codes).double()


def _int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    nibbles = torch.stack([(packed >> (4 * j)) & 15 for j in range(8)], -1).reshape(packed.shape[0], -1)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def _int4_pack(values: torch.Tensor) -> torch.Tensor:
    v = (values.to(torch.int64) & 15).reshape(values.shape[0], -1, 8)
    out = torch.zeros(v.shape[:2], dtype=torch.int64)
    for j in range(8):
        out |= v[..., j] << (4 * j)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def npu_quantize(x, scales, zero_points, dtype, axis=-1, div_mode=True):
    calls.append("npu_quantize")
    assert dtype == torch.qint8 and axis == -1 and div_mode is False
    return torch.round(x.float() * scales.float() + zero_points.float()).clamp(-128, 127).to(torch.int8)


def npu_dynamic_quant(x, *, smooth_scales=None, dst_type=None):
    calls.append("npu_dynamic_quant")
    x = x.double() * (1 if smooth_scales is None else smooth_scales.double())
    qmax = 7 if dst_type == torch.quint4x2 else 127
    scale = x.abs().amax(-1) / qmax
    y = torch.round(x / torch.where(scale > 0, scale, 1)[:, None])
    return (_int4_pack(y) if qmax == 7 else y.to(torch.int8)), scale.float()


def npu_convert_weight_to_int4pack(w):
    calls.append("npu_convert_weight_to_int4pack")
    assert w.dtype == torch.int32
    return _int4_pack(w)


def npu_trans_quant_param(scale):
    return scale.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def npu_format_cast(t, fmt, customize_dtype=None):
    assert fmt == 29
    return t


def _mx_scales(blocks: torch.Tensor, rule: str, emax: int, c: float) -> torch.Tensor:
    exps = []
    for a in blocks.abs().amax(-1).flatten().tolist():
        if a == 0:
            exps.append(-127)
        elif rule == "ocp":
            exps.append(log2_floor(a) - emax)
        else:
            exps.append(math.ceil(math.log2(float(torch.tensor(a) / c))))
    return (torch.tensor(exps).clamp(-127, 127) + 127).to(torch.uint8).reshape(blocks.shape[:-1])


def npu_dynamic_mx_quant(x, *, axis=-1, round_mode="rint", dst_type=None, block_size=32, scale_alg=0,
                         dst_type_max=0.0, max_low_bound=0.0):
    calls.append("npu_dynamic_mx_quant")
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    fp4 = dst_type == float4_e2m1fn_x2
    rule = "ocp" if scale_alg == 0 else "alg2"
    scales = _mx_scales(blocks, rule, 2 if fp4 else 8, dst_type_max)
    scaled = blocks / _e8m0(scales).float()[..., None]
    ties = {"rint": "even", "round": "away"}[round_mode]
    if fp4:
        codes = e2m1_codes(scaled, ties).reshape(m, k)
        y = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    else:
        assert round_mode == "rint"
        y = e4m3_round(scaled, "even").reshape(m, k)
    scales = torch.nn.functional.pad(scales, (0, scales.shape[1] % 2))  # [M, ceil(ceil(K/32)/2), 2]
    return y, scales.reshape(m, -1, 2)


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None):
    calls.append("npu_quant_matmul")
    if scale_dtype == float8_e8m0fnu:  # MX: per-32 scales on both sides along K
        assert group_sizes == [1, 1, 32] and pertoken_scale_dtype == float8_e8m0fnu
        if x1_dtype == float4_e2m1fn_x2:
            a, b = _unpack_fp4(x1), _unpack_fp4(x2.t())
        else:
            a, b = x1.double(), x2.t().double()
        sa, sb = _e8m0(_unpair(pertoken_scale)), _e8m0(_unpair(scale.transpose(0, 1)))
        a = (a.reshape(a.shape[0], -1, 32) * sa[..., None]).reshape(a.shape[0], -1)
        b = (b.reshape(b.shape[0], -1, 32) * sb[..., None]).reshape(b.shape[0], -1)
        y = a @ b.T
        return (y if bias is None else y + bias.double()).to(output_dtype)
    if x1.dtype == torch.int32:  # int4 packed 8 per int32
        a, b = _int4_unpack(x1).double(), _int4_unpack(x2).double()
    else:
        assert x1.dtype == torch.int8 and x2.dtype == torch.int8
        a, b = x1.double(), x2.double()
    acc = a @ b  # x2 is [K, N]
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.double()
    if scale.dtype == torch.int64:
        scale = (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    y = acc * scale.double().reshape(1, -1)
    if pertoken_scale is not None:
        y = y * pertoken_scale.double().reshape(-1, 1)
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.double()
    return y.to(output_dtype)


def npu_dynamic_dual_level_mx_quant(x, *, smooth_scale=None, round_mode="rint"):
    calls.append("npu_dynamic_dual_level_mx_quant")
    m, k = x.shape  # a partial last 512-block is zero-padded (level-0 scales: ceil(K/512))
    padded = torch.nn.functional.pad(x.float(), (0, -k % 512)).reshape(m, -1, 512)
    l0 = padded.abs().amax(-1) / 6.0
    t = (padded / torch.where(l0 > 0, l0, 1)[..., None]).to(x.dtype).float().reshape(m, -1, 32)
    l1 = _mx_scales(t, "ocp", 2, 0)
    codes = e2m1_codes(t / _e8m0(l1).float()[..., None], "even").reshape(m, -1)[:, :k]
    l1 = torch.nn.functional.pad(l1[:, : -(-k // 32)], (0, -(-k // 32) % 2))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8), l0, l1.reshape(m, -1, 2)


def npu_dual_level_quant_matmul(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale, *,
                                bias=None, output_dtype=15):
    calls.append("npu_dual_level_quant_matmul")
    a, b = _unpack_fp4(x1), _unpack_fp4(x2.view(torch.uint8))
    rows = []
    for operand, l1, l0 in ((a, x1_level1_scale, x1_level0_scale), (b, x2_level1_scale, x2_level0_scale.t())):
        v = operand.reshape(operand.shape[0], -1, 32) * _e8m0(_unpair(l1))[..., None]
        v = v.reshape(operand.shape[0], -1, 512) * l0.double()[..., None]
        rows.append(v.reshape(operand.shape[0], -1))
    y = rows[0] @ rows[1].T
    y = y if bias is None else y + bias.double()
    return y.to({15: torch.bfloat16, 5: torch.float16, 6: torch.float32}[output_dtype])


npu = SimpleNamespace(get_device_name=lambda index=0: "Ascend950PR")
module = SimpleNamespace(**{k: v for k, v in dict(globals()).items() if k.startswith("npu_")},
                         float8_e8m0fnu=float8_e8m0fnu, float4_e2m1fn_x2=float4_e2m1fn_x2, npu=npu)
