"""nunchaku's own CUDA kernels, when the real nunchaku library is installed and the GPU has them.

A thin adapter over nunchaku's documented ops (``nunchaku.ops.quantize``,
``nunchaku.ops.gemm``, ``nunchaku.ops.gemv``; compiled for SM75, 80, 86, 89 and 120 only).
``process_weights_after_loading`` packs the plain layouts back into nunchaku's tiles
(``packing.pack_*``), one set per input part; ``apply`` quantizes the input with the fused
low-rank down projection and runs the W4A4 GEMM with the low-rank up projection, per part.
The unfused ops have no unsigned activation quantization, so an unsigned part (the GELU output
of fc2) runs signed, with its shift folded into the bias as in the weight-only method.
AWQ modulation linears run nunchaku's W4A16 GEMV, packed in diffusers' row order.
PyPI's ``nunchaku`` is an unrelated project: the real library has ``nunchaku.ops.gemm``.
"""

from __future__ import annotations

import importlib

import torch

from . import packing
from .reference import GROUP, AwqReferenceMethod, SvdqReferenceMethod
from .weight_only import prepare_svdq

INSTALL = ("install nunchaku's wheel for your torch and CUDA from https://github.com/nunchaku-ai/nunchaku/releases "
           "(or huggingface.co/nunchaku-tech/nunchaku); `pip install nunchaku` installs an unrelated PyPI project")
INT4_SMS = ((7, 5), (8, 0), (8, 6), (8, 9))
FP4_SMS = ((12, 0), (12, 1))


def library_reason() -> str | None:
    """None when the real nunchaku imports with its ops, else why not."""
    try:
        importlib.import_module("nunchaku")
    except Exception as exc:  # a missing wheel, or an ABI clash with this torch
        return f"nunchaku does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {INSTALL}"
    try:
        gemm = importlib.import_module("nunchaku.ops.gemm")
        importlib.import_module("nunchaku.ops.quantize")
    except Exception as exc:
        return f"the installed 'nunchaku' is not nunchaku-ai's library (no nunchaku.ops: {type(exc).__name__}); {INSTALL}"
    if not hasattr(gemm, "svdq_gemm_w4a4_cuda"):
        return f"nunchaku.ops.gemm has no svdq_gemm_w4a4_cuda; {INSTALL}"
    return None


def gpu_reason(platform, precision: str | None) -> str | None:
    if platform.device_kind != "cuda" or platform.capability is None:
        return f"nunchaku's kernels run on NVIDIA GPUs; this is {platform.device_kind}"
    sm = tuple(platform.capability)
    name = f"SM{sm[0]}{sm[1]}"
    if precision == "int4" and sm not in INT4_SMS:
        return f"nunchaku's int4 kernels are built for SM75, SM80, SM86 and SM89; this GPU is {name}"
    if precision == "nvfp4" and sm not in FP4_SMS:
        return f"nunchaku's nvfp4 kernels need SM120/121; this GPU is {name}"
    if sm not in INT4_SMS + FP4_SMS:
        return f"nunchaku has kernels for SM75-89 and SM120 only; this GPU is {name} (Hopper has no 4-bit tensor cores)"
    return None


def native_reason(layer, platform, precision: str | None) -> str | None:
    reason = gpu_reason(platform, precision) or library_reason()
    if reason is None and layer.dtype not in (torch.bfloat16, torch.float16):
        reason = f"nunchaku's kernels take bf16 or fp16 activations, not {layer.dtype}"
    if reason is None and platform.capability == (7, 5) and layer.dtype != torch.float16:
        reason = "Turing runs nunchaku's kernels in fp16 only (--dtype fp16)"
    return reason


def nunchaku_arguments(layer, fmt, precision: str) -> list[dict]:
    """Per input part, the tensors nunchaku's ops take, in nunchaku's packed layouts."""
    parts, _, bias = prepare_svdq(layer, fmt, precision)
    fp4, group = precision == "nvfp4", GROUP[precision]
    out, rank_lo = [], 0
    for i, (p, spec) in enumerate(zip(parts, fmt.parts)):
        rank_hi = rank_lo + spec.rank
        out.append({
            "lo": p.lo, "hi": p.hi,
            "qweight": packing.pack_qweight(p.weight),
            "wscales": packing.pack_fp4_scales(p.scale) if fp4 else packing.pack_scales(p.scale),
            "smooth": packing.pack_vector(layer.smooth_factor[p.lo:p.hi]),
            "proj_down": packing.pack_lowrank(layer.proj_down[rank_lo:rank_hi, p.lo:p.hi].contiguous(), down=True),
            "proj_up": packing.pack_lowrank(layer.proj_up[:, rank_lo:rank_hi].contiguous(), down=False),
            # one part carries the bias: the parts' outputs add
            "bias": packing.pack_vector((bias if i == 0 else torch.zeros_like(bias)).to(layer.compute_dtype)),
            "wcscales": packing.pack_vector(p.channel_scale.to(layer.compute_dtype)) if fp4 else None,
            "alpha": float(p.global_scale) if fp4 else None,
        })
        rank_lo = rank_hi
    assert group in (16, 64)
    return out


class SvdqNunchakuMethod(SvdqReferenceMethod):
    name = "svdq-nunchaku"
    kind = "native"

    def process_weights_after_loading(self, layer):
        parts = nunchaku_arguments(layer, self.format, self.precision)
        self.parts = [{k: v for k, v in a.items() if not isinstance(v, torch.Tensor)} for a in parts]
        for i, a in enumerate(parts):  # buffers, so that .to() and offload move them with the layer
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    layer.register_buffer(f"nunchaku{i}_{key}", value, persistent=False)
        for name in ("qweight", "wscales", "proj_down", "proj_up", "smooth_factor", "wcscales", "wtscale"):
            if hasattr(layer, name):
                delattr(layer, name)

    def apply(self, layer, x, bias):
        from nunchaku.ops.gemm import svdq_gemm_w4a4_cuda
        from nunchaku.ops.quantize import svdq_quantize_w4a4_act_fuse_lora_cuda

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = None
        fp4 = self.precision == "nvfp4"
        for i, meta in enumerate(self.parts):
            a = {**meta, **{k: getattr(layer, f"nunchaku{i}_{k}", None) for k in
                            ("qweight", "wscales", "smooth", "proj_down", "proj_up", "bias", "wcscales")}}
            xp = x2[:, a["lo"]:a["hi"]].contiguous()
            qx, ascales, lora_act = svdq_quantize_w4a4_act_fuse_lora_cuda(
                xp, lora_down=a["proj_down"], smooth=a["smooth"], fp4=fp4, pad_size=256)
            out = torch.empty(x2.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
            svdq_gemm_w4a4_cuda(act=qx, wgt=a["qweight"], out=out, ascales=ascales, wscales=a["wscales"],
                                lora_act_in=lora_act, lora_up=a["proj_up"], bias=a["bias"], fp4=fp4,
                                alpha=a["alpha"], wcscales=a["wcscales"], act_unsigned=False)
            y = out if y is None else y + out
        return y.reshape(*shape[:-1], -1)


def awq_arguments(layer) -> dict:
    return {"kernel": packing.pack_awq_qweight(layer.qweight), "scaling_factors": layer.wscales.t().contiguous(),
            "zeros": layer.wzeros.t().contiguous()}


class AwqNunchakuMethod(AwqReferenceMethod):
    name = "awq-nunchaku"
    kind = "native"

    def process_weights_after_loading(self, layer):
        for key, value in awq_arguments(layer).items():
            layer.register_buffer(f"nunchaku_{key}", value, persistent=False)
        del layer.qweight, layer.wscales, layer.wzeros

    def apply(self, layer, x, bias):
        from nunchaku.ops.gemv import awq_gemv_w4a16_cuda

        x2 = x.reshape(-1, x.shape[-1])
        y = awq_gemv_w4a16_cuda(in_feats=x2, kernel=layer.nunchaku_kernel, scaling_factors=layer.nunchaku_scaling_factors,
                                zeros=layer.nunchaku_zeros, m=x2.shape[0], n=layer.out_features, k=layer.in_features,
                                group_size=64)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], -1)
