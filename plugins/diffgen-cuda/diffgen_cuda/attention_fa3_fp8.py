"""FlashAttention-3's Hopper kernels as attention backends: ``fp8-fa3`` (``--attention fp8-fa3``), a
thin adapter over FA3's own ``flash_attn_interface.flash_attn_func`` with E4M3 operands and per-head
descales, and ``fa3`` (``--attention fa3``), exact bf16 attention through PyTorch's flash SDPA once
``torch.nn.attention.activate_flash_attention_impl("FA3")`` (PyTorch 2.11+) has registered FA3.
FA3 is built from Dao-AILab/flash-attention's ``hopper/`` directory; no wheel of it is on PyPI.

Why a third FP8 backend: FA3's FP8 forward is a warp-specialized Hopper kernel, 938 TFLOP/s at
Wan2.2 720p on an H200, where cuDNN's bf16 attention reaches 0.57-0.64 PFLOP/s and diffgen's
Triton kernel 0.70 (docs/support-matrix.md, docs/benchmarks/attention_fa3_H200.json).

The math, per batch entry b and head h (what the kernel takes: E4M3 operands and one fp32
descale per (b, h); P is rounded to FP8 inside FA3's kernel):
  k is smoothed first: k - mean over tokens of k (softmax is unchanged: it adds one constant per
    query row to the scores), so that K's common offset does not eat E4M3's range
  descale_x[b, h] = amax(x[b, :, h, :]) / 448 (1 where the head is all zeros)
  x8 = E4M3(clamp(x * (1 / descale_x), -448, 448))
  O = softmax(q8 k8^T * descale_q * descale_k * scale) (v8 * descale_v), written in bf16
q, k, v arrive in diffusers' [B, L, H, D], FA3's own layout: the codes are written in it and the
output comes back in it. (The first version went through PyTorch's experimental FP8 SDPA,
``torch.nn.attention.experimental._scaled_dot_product_attention_quantized``, on [B, H, L, D] views;
FA3's documented function is the same kernel without a private PyTorch API in between. A Wan2.2
step ran as fast either way on an H100: 373.1 against 373.7 ms.) The quantization runs on the
device with no host synchronization: two Triton passes per tensor (the amax, for K with its token
mean, then the codes), no fp32 copy of a tensor.

Activating FA3 (the bf16 backend) is process-wide: PyTorch's flash SDPA implementation becomes
FA3's for every later call (cuDNN, which PyTorch's default dispatch picks at diffusion shapes on
Hopper, is not affected). It is done on the first call, not at import.

On the CPU the argument preparation is tested against the format's definition and the call's
contract against a stand-in for FA3's function; the real calls are GPU tests that skip without FA3
(run on an H200 and an H100: docs/validation/fa3_gpu_tests_*.log).
"""

from __future__ import annotations

import importlib
import threading

import torch

from diffgen.attention import AttentionBackend, AttentionCall

from .attention_fp8 import checked_call, compiled_as_eager, layout_reason, short_keys_reason

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FA3_MODULE = "flash_attn_interface"
# Below this many keys the whole call (quantization included) was slower than cuDNN's bf16 SDPA on an
# H200 (docs/benchmarks/attention_fa3_H200.json: 0.55x at FLUX.1's 4,608 keys, 0.73x at Qwen-Image's
# 7,145, 0.74x for Wan's 512 text keys; 1.61x at 75,600). Such calls fall back to SDPA.
MIN_KEYS = 8192
_LOCK = threading.Lock()
_ACTIVE = []  # [True] once this process activated FA3


def _operator():
    """FA3's ``flash_attn_func``, or raise ImportError naming what is missing."""
    try:
        return importlib.import_module(FA3_MODULE).flash_attn_func
    except Exception as exc:  # missing, or its CUDA library failed to load
        raise ImportError(f"FlashAttention-3 is not importable as {FA3_MODULE} ({type(exc).__name__}: {exc}); "
                          "build it from github.com/Dao-AILab/flash-attention (cd hopper && python setup.py "
                          "install)") from exc


def unavailable_reason(platform, fp8: bool = True) -> str | None:
    """None when FA3's FP8 attention (``fp8``) or its bf16 attention runs on ``platform``; else why
    not, in words."""
    what = "FP8" if fp8 else "bf16"
    if platform.device_kind != "cuda":
        return f"FlashAttention-3's {what} attention runs on NVIDIA GPUs; this device is {platform.device_kind}"
    capability = platform.capability or (0, 0)
    if capability[0] != 9:
        return (f"FlashAttention-3's {what} kernel is Hopper's (SM90); this GPU is SM{capability[0]}{capability[1]}"
                + (" (the backend `fp8-cudnn` runs on SM90 and later, `fp8` on SM89 and later)" if fp8 else ""))
    try:
        _operator()
    except ImportError as exc:
        return str(exc)
    if not hasattr(torch.ops, "flash_attn_3") or not hasattr(torch.ops.flash_attn_3, "fwd"):
        return f"{FA3_MODULE} is importable but registers no torch.ops.flash_attn_3.fwd (another FA3 build?)"
    if not fp8:  # the bf16 backend runs FA3 through PyTorch's flash SDPA
        try:
            from torch.nn.attention import list_flash_attention_impls
        except ImportError as exc:
            return f"PyTorch {torch.__version__} cannot make FA3 its flash attention (PyTorch 2.11+): {exc}"
        if "FA3" not in list_flash_attention_impls():
            return f"PyTorch {torch.__version__} lists no FA3 flash attention implementation"
    return None


def activate() -> None:
    """Make FA3 PyTorch's flash attention implementation, once per process."""
    with _LOCK:
        if not _ACTIVE:
            from torch.nn.attention import activate_flash_attention_impl

            activate_flash_attention_impl("FA3")
            _ACTIVE.append(True)


def is_active() -> bool:
    """Whether this process made FA3 PyTorch's flash attention implementation."""
    return bool(_ACTIVE)


def quantize_per_head(x: torch.Tensor, smooth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, descale) for ``x`` [B, L, H, D]: E4M3 codes [B, L, H, D] of x (less its mean over tokens
    when ``smooth``) times 1 / descale, saturated at +-448, and descale = amax per (b, h) / 448 as
    fp32 [B, H] (1 for an all-zero head). On a GPU: two Triton passes (``kernels.fp8_quant``: the
    amax, or with ``smooth`` the mean and the amax, then the codes), no fp32 copy of x; elsewhere
    the same math in PyTorch ops (the GPU's mean is summed in another order)."""
    if x.is_cuda:
        from .fused import kernels

        quant = kernels().quant
        mean, amax = quant.head_stats(x) if smooth else (None, quant.head_amax(x))
    else:
        mean = x.mean(dim=1, dtype=torch.float32) if smooth else None  # [B, H, D]
        xf = x.float() if mean is None else x.float() - mean[:, None]
        amax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=(1, 3))
    # times the reciprocal, as the per-tensor backends compute their descale
    descale = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    if x.is_cuda:
        return quant.quant_fp8_per_head(x, mean, descale, FP8), descale
    x8 = (xf * descale.reciprocal()[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, descale


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """``flash_attn_func``'s FP8 arguments for diffusers' [B, L, H, D] q, k, v: E4M3 codes in the
    same layout (contiguous) and fp32 [B, H] descales."""
    (q8, dq), (k8, dk), (v8, dv) = quantize_per_head(q), quantize_per_head(k, smooth=True), quantize_per_head(v)
    return dict(q=q8, k=k8, v=v8, q_descale=dq, k_descale=dk, v_descale=dv)


def run_prepared(args: dict, sm_scale: float) -> torch.Tensor:
    """FA3's FP8 kernel on ``prepare``'s arguments: bf16 [B, Lq, H, D]."""
    return _operator()(**args, softmax_scale=sm_scale, causal=False)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    return run_prepared(prepare(q, k, v), sm_scale).contiguous()


_call = compiled_as_eager("attention_fa3_fp8", _run)


def attention_fa3_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v by FA3's FP8 kernel; q [B, Lq, H, D], k and v [B, Lk, H, D], bf16;
    out [B, Lq, H, D] contiguous bf16. ``scale`` defaults to D ** -0.5."""
    return checked_call("attention_fa3_fp8", _call, q, k, v, scale, dtypes=(torch.bfloat16,))


def reference_attention_fa3_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """What the per-head FP8 operands alone cost: ``prepare``'s codes times their descales, then
    attention in fp32 (P not rounded; FA3 rounds it to E4M3, which the GPU test bounds
    separately). float32 [B, Lq, H, D], any device."""
    args = prepare(q, k, v)
    deq = [args[name].float().transpose(1, 2) * args[f"{name}_descale"][:, :, None, None]
           for name in ("q", "k", "v")]  # [B, H, L, D]
    sm_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    s = deq[0] @ deq[1].transpose(-1, -2) * sm_scale
    return (torch.softmax(s, dim=-1) @ deq[2]).transpose(1, 2)


def _flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """PyTorch's flash SDPA on [B, H, L, D]: FA3's bf16 kernel once ``activate`` ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm_scale)


def _run_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    activate()
    out = _flash_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sm_scale)
    return out.transpose(1, 2).contiguous()


_call_bf16 = compiled_as_eager("attention_fa3", _run_bf16)


def attention_fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v by FA3's bf16 kernel (exact attention, as SDPA); q [B, Lq, H, D], k
    and v [B, Lk, H, D], bf16; out [B, Lq, H, D] contiguous bf16. ``scale`` defaults to D ** -0.5."""
    return checked_call("attention_fa3", _call_bf16, q, k, v, scale, dtypes=(torch.bfloat16,))


class _Fa3Backend(AttentionBackend):
    """What the FA3 backends share: bf16 [B, L, H, D] calls with at least MIN_KEYS keys."""

    fp8 = True

    def unavailable_reason(self, platform) -> str | None:
        return unavailable_reason(platform, fp8=self.fp8)

    def call_unsupported_reason(self, call: AttentionCall) -> str | None:
        reason = layout_reason(call.query, call.key, call.value, heads_first=False, dtypes=(torch.bfloat16,))
        if reason is None:
            reason = short_keys_reason(call.key.shape[1], MIN_KEYS,
                                       f"FlashAttention-3's {'FP8' if self.fp8 else 'bf16'} attention",
                                       "docs/benchmarks/attention_fa3_H200.json")
        return reason


class Fa3AttentionBackend(_Fa3Backend):
    """``--attention fa3``: exact bf16 attention by FA3's kernel, for 16-bit models. On an H200 it
    was 1.18x faster than cuDNN's bf16 SDPA (PyTorch's default there) at Wan2.2 and HunyuanVideo
    720p lengths, and no faster at FLUX.1's 4,608 keys or for 512 text keys
    (docs/benchmarks/attention_fa3_H200.json, its ``fa3_bf16`` rows), hence the same key threshold."""

    name = "fa3"
    description = "FlashAttention-3's bf16 kernel (flash_attn_interface built from FA3's hopper/): exact attention"
    fp8 = False

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return attention_fa3(call.query, call.key, call.value, scale=call.scale)


BF16_BACKEND = Fa3AttentionBackend()


class Fa3Fp8AttentionBackend(_Fa3Backend):
    name = "fp8-fa3"
    description = ("FlashAttention-3's FP8 kernel (flash_attn_interface.flash_attn_func, built from FA3's "
                   "hopper/): per-head E4M3 Q, K (smoothed), V")

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return attention_fa3_fp8(call.query, call.key, call.value, scale=call.scale)


BACKEND = Fa3Fp8AttentionBackend()
