"""FP8 attention (SageAttention2-style): the Python face of ``kernels.attention_fp8``, its CPU
reference, and the attention backend ``fp8`` that ``--attention fp8`` installs.

Inputs q [B, Lq, H, D], k and v [B, Lk, H, D] (diffusers' ``dispatch_attention_fn`` layout) or
[B, H, L, D] (``heads_first``), bf16 or fp16, D 64 or 128, no mask, not causal; out like q.
The math (kernels/attention_fp8.py has it in full): K less its mean over tokens (exact under
softmax); Q and K INT8 with one scale per block of tokens (sm_scale * log2(e) folded into Q's);
V E4M3 with one scale per channel; S = q8.k8^T * sq * sk exact in int32; online softmax in fp32
with exp2; P = exp2(S - m + 8) rounded to E4M3 for P.V; fp32 accumulation; O = acc / l * sv.

``reference_attention_fp8`` is that math in float32 PyTorch on any device, key block by key
block as the kernel walks them, so a GPU test separates the kernel's bugs (against the reference,
tight) from the quantization's error (reference against fp32 SDPA, the bounds in the tests).
"""

from __future__ import annotations

import math
import os
import re

import torch

from diffgen.attention import AttentionBackend, AttentionCall
from diffgen.errors import DiffgenError

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128)
INT8_MAX, FP8_E4M3_MAX, P_EXPONENT_OFFSET = 127.0, 448.0, 8.0

# A launch config is named "m<BLOCK_M>n<BLOCK_N>w<warps>s<stages>" and its options, each "-<option>":
OPTIONS = {
    "i2f": "S from int32 to fp32 by I2F (quarter rate), not by the magic-number add and bitcast",
    "fold": "the INT8 scores' conversion constant subtracted inside the exp2 argument's FMA",
    "r<N>": "at most N registers per thread (ptxas's maxnreg), so more programs share an SM",
    "gluon": "the Gluon kernel (kernels/attention_gluon.py): fold's math, with block j+1's Q.K^T and block j-1's "
             "P.V in flight during block j's softmax; BLOCK_M is 16 x warps, 3+ stages, no other option",
}
_OPTION_ARGS = {"i2f": ("magic_i2f", False), "fold": ("fold_i2f", True), "gluon": ("gluon", True)}
_NAME = re.compile(r"m(\d+)n(\d+)w(\d+)s(\d+)((?:-[a-z0-9]+)*)")


def launch_config(name: str) -> dict:
    """The kernel's keyword arguments for a config name (``OPTIONS``), or ValueError."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"attention_fp8: config {name!r} is not m<BLOCK_M>n<BLOCK_N>w<warps>s<stages>[-option...] "
                         f"(options: {', '.join(OPTIONS)})")
    block_m, block_n, warps, stages = (int(g) for g in match.groups()[:4])
    options = match.group(5).split("-")[1:]
    registers = [int(o[1:]) for o in options if re.fullmatch(r"r\d+", o)]
    options = [o for o in options if not re.fullmatch(r"r\d+", o)]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown or block_m not in (64, 128) or block_n not in (64, 128):
        raise ValueError(f"attention_fp8: config {name!r}: blocks of 64 or 128 and options among "
                         f"{', '.join(OPTIONS)} (got {', '.join(unknown) or 'other blocks'})")
    if "fold" in options and "i2f" in options:
        raise ValueError(f"attention_fp8: config {name!r}: fold is a change to the magic-number conversion "
                         "of INT8 scores, so it excludes i2f")
    if len(registers) > 1 or any(not 64 <= r <= 255 for r in registers):
        raise ValueError(f"attention_fp8: config {name!r}: one register cap r<N>, N from 64 to 255")
    if "gluon" in options and (len(options) > 1 or registers or block_m != 16 * warps or stages < 3):
        raise ValueError(f"attention_fp8: config {name!r}: the Gluon kernel takes BLOCK_M = 16 x warps, 3 or more "
                         "stages and no other option")
    if "gluon" in options and block_n != 128:
        # m64n64w4s3-gluon gave NaN at 3 heads x 4096 x 4096, head dim 64, on an H100 (and a 5% error in
        # an earlier run), while its tests at up to 1000 keys passed; not understood
        raise ValueError(f"attention_fp8: config {name!r}: the Gluon kernel with 64-key blocks gave wrong "
                         "results on an H100 at 4096 keys (docs/support-matrix.md); use 128-key blocks")
    config = dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages, magic_i2f=True,
                  fold_i2f=False, maxnreg=registers[0] if registers else None, gluon=False)
    config.update(_OPTION_ARGS[o] for o in options)
    config["fold_i2f"] |= config["gluon"]  # the Gluon kernel computes fold's math
    return config


# The configs the benchmark sweeps and the GPU tests run by default; DEFAULT_CONFIG is what the
# backend runs. Compiled for sm_90a on the CPU (benchmarks/attention_sass.py,
# docs/benchmarks/attention_sass_sm90.json), an m128 w8 program holds 203-237 registers per thread,
# so one fits on an SM and its two warpgroups stay in step (a CTA barrier every key block): the
# MMAs and the softmax never overlap. The m64 w4 ones hold 168-248, so two programs share an SM
# (three with r168) and one's MMAs can overlap another's softmax. The -gluon ones overlap them within
# a warpgroup (kernels/attention_gluon.py). Fourteen were timed against cuDNN bf16 on an H200 or an
# H100 (docs/benchmarks/attention_H200.json, attention_variants_H200.json, attention_gluon_H100.json;
# docs/support-matrix.md), none more than 2% faster than the default at Wan2.2's length; m128n128w8s2-fold,
# m64n128w4s2, m64n128w4s3-fold and m64n64w4s4-fold-r168 were not timed. Two options were removed:
# E4M3 Q and K (-fp8qk) and the packed fp16 exp2 for P (-ex2h) were farther from their own
# reference than the GPU tests allow at 3 heads x 4096 x 4096 on an H200
# (docs/validation/attention_configs_4096_gpu_tests_H200.log), not understood, and neither was
# faster than the default (docs/support-matrix.md). The GPU tests run every config against its reference.
CONFIGS = ("m128n128w8s3", "m128n64w8s4", "m128n64w4s3", "m128n128w8s3-i2f",
           "m128n128w8s3-fold", "m128n128w8s2-fold",
           "m64n128w4s2", "m64n128w4s2-fold", "m64n128w4s3-fold", "m64n64w4s3-fold", "m64n64w4s3-fold-r168",
           "m64n64w4s2-fold-r168", "m64n64w4s4-fold-r168",
           "m128n128w8s3-gluon", "m128n128w8s4-gluon", "m64n128w4s3-gluon")
DEFAULT_CONFIG = "m128n128w8s3"
# What a GPU that cannot run DEFAULT_CONFIG runs (Triton's own kernel: SM89+, Hopper and after).
PORTABLE_CONFIG = "m128n128w8s3"


def device_reason(config: str, capability: tuple[int, int]) -> str | None:
    """None when ``config`` runs on a GPU of ``capability``; else why not. The -gluon configs are
    written with Hopper's wgmma, which neither Ada (SM89) nor Blackwell (SM100+) has."""
    if launch_config(config)["gluon"] and capability[0] != 9:
        return (f"config {config!r} is the Gluon kernel, written with Hopper's wgmma (SM90); this GPU is "
                f"SM{capability[0]}{capability[1]}")
    return None


def default_config(capability: tuple[int, int]) -> str:
    """DEFAULT_CONFIG where it runs, PORTABLE_CONFIG elsewhere."""
    return PORTABLE_CONFIG if device_reason(DEFAULT_CONFIG, capability) else DEFAULT_CONFIG


# Below this many keys a call (pre-pass included) was slower than bf16 SDPA on an H200 with every
# config (docs/benchmarks/attention_H200.json: 0.67x at FLUX.1's 4,608 keys, 0.79x at Qwen-Image's
# 7,145, 0.59x for Wan's 512 text keys; 1.19x at 75,600). Such calls fall back to SDPA.
MIN_KEYS = 8192
MIN_KEYS_ENV = "DIFFGEN_FP8_ATTENTION_MIN_KEYS"  # another threshold: another GPU's crossover, or 0


def short_keys_reason(keys: int, measured: int, what: str, evidence: str) -> str | None:
    """Why a call of ``keys`` keys goes to SDPA, or None: below ``measured`` keys ``what`` was slower
    than bf16 SDPA on an H200 (``evidence``), unless DIFFGEN_FP8_ATTENTION_MIN_KEYS sets another
    threshold (the crossover of another GPU; 0 routes every call, e.g. for a quality run)."""
    text = os.environ.get(MIN_KEYS_ENV)
    if text is None:
        if keys >= measured:
            return None
        return (f"{keys} keys: below {measured} {what} was slower than bf16 SDPA on an H200 ({evidence}; "
                f"{MIN_KEYS_ENV} sets another threshold)")
    if not text.strip().isdigit():
        raise DiffgenError(f"{MIN_KEYS_ENV}={text!r}: expected a whole number of keys (0 routes every call)")
    return None if keys >= int(text) else f"{keys} keys: below {MIN_KEYS_ENV}={int(text)}"


def unavailable_reason(platform) -> str | None:
    """None when the kernel runs on ``platform`` (a diffgen Platform); else why not, in words."""
    from .fused import triton_unavailable_reason

    reason = triton_unavailable_reason(platform)
    capability = platform.capability or (0, 0)
    if reason is None and capability < (8, 9):
        reason = (f"FP8 attention multiplies E4M3 on FP8 tensor cores (SM89+); this GPU is "
                  f"SM{capability[0]}{capability[1]}")
    return reason


KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compiled_as_eager(name: str, run):
    """``run(q, k, v, sm_scale) -> out shaped like q`` behind an opaque operator
    ``diffgen_cuda::<name>``, so that a compiled graph calls the eager code and gets its bits; eager
    calls go to ``run`` directly (no operator dispatch per call). For the library backends."""
    def body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
        return run(q, k, v, sm_scale)

    op = torch.library.custom_op(f"diffgen_cuda::{name}", body, mutates_args=())
    op.register_fake(lambda q, k, v, sm_scale: q.new_empty(q.shape))

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
        return op(q, k, v, sm_scale) if torch.compiler.is_compiling() else run(q, k, v, sm_scale)

    return call


def checked_call(name: str, call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                 dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> torch.Tensor:
    """``call(q, k, v, sm_scale)`` for [B, L, H, D] inputs that ``layout_reason`` takes (else
    ValueError naming ``name``), ``scale`` defaulting to D ** -0.5. For the library backends'
    public functions."""
    reason = layout_reason(q, k, v, heads_first=False, dtypes=dtypes)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    return call(q, k, v, float(scale) if scale is not None else q.shape[-1] ** -0.5)


def layout_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads_first: bool,
                  dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> str | None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return f"needs 4-D q, k, v with k and v alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        names = " or ".join(_SHORT[d] for d in dtypes)
        return f"needs {names} q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (k {k.shape[-1]}): the kernel has head dims {HEAD_DIMS}"
    head = 1 if heads_first else 2
    if q.shape[0] != k.shape[0] or q.shape[head] != k.shape[head]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or heads (no GQA)"
    return None


def _run(q, k, v, heads_first: bool, sm_scale: float, config: str) -> torch.Tensor:
    from .kernels import attention_fp8 as kernels

    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
    config = config or default_config(capability)
    reason = device_reason(config, capability) if q.is_cuda else None
    if reason is not None:
        raise ValueError(f"attention_fp8: {reason}")
    cfg = launch_config(config)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    token = 2 if heads_first else 1
    B, H, D = q.shape[0], q.shape[1 if heads_first else 2], q.shape[3]
    # Per-(batch, head) channel statistics over all tokens: one reduction pass each, no copies (a
    # 16-bit max is exact; the mean accumulates in fp32 from 16-bit reads).
    k_mean = k.mean(dim=token, dtype=torch.float32).reshape(B * H, D).contiguous()
    v_amax = torch.linalg.vector_norm(v, ord=math.inf, dim=token).float().reshape(B * H, D)
    sv = torch.where(v_amax > 0, v_amax / FP8_E4M3_MAX, torch.ones_like(v_amax)).contiguous()
    k8, sk, v8 = kernels.quantize_kv(k, v, heads_first, cfg["block_n"], k_mean, sv)
    out = torch.empty_like(q)
    kernels.attention(q, k8, sk, v8, sv, out, heads_first, sm_scale, k.shape[token], **cfg)
    return out


# An opaque operator: under torch.compile the graph calls the eager code above, so compiled and
# eager give the same bits (Inductor would otherwise re-derive the mean and amax reductions).
@torch.library.custom_op("diffgen_cuda::attention_fp8", mutates_args=())
def attention_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads_first: bool, sm_scale: float,
                     config: str) -> torch.Tensor:
    return _run(q, k, v, heads_first, sm_scale, config)


@attention_fp8_op.register_fake
def _(q, k, v, heads_first, sm_scale, config):
    return torch.empty_like(q)


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads_first: bool = False,
                  scale: float | None = None, config: str | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v on the FP8/INT8 tensor cores; q [B, Lq, H, D] (or [B, H, Lq, D] with
    ``heads_first``), k and v alike with Lk tokens; out like q. ``scale`` defaults to D ** -0.5;
    ``config`` to the default launch config for q's GPU (``default_config``)."""
    reason = layout_reason(q, k, v, heads_first)
    if reason is not None:
        raise ValueError(f"attention_fp8: {reason}")
    if config is not None:
        launch_config(config)  # a bad name is refused here, before any work
    sm_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return attention_fp8_op(q, k, v, heads_first, sm_scale, config or "")
    return _run(q, k, v, heads_first, sm_scale, config or "")


# -- the reference ----------------------------------------------------------------------------------

def _blocks(x: torch.Tensor, block: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] fp32 -> (INT8 codes [B, H, L_pad, D] fp32, scales [B, H, L_pad/block]), zero-padded."""
    B, H, L, D = x.shape
    pad = -L % block
    x = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(B, H, -1, block, D)
    amax = x.abs().amax(dim=(-2, -1), keepdim=True)
    amax = torch.where(amax > 0, amax, torch.full_like(amax, INT8_MAX))
    xq = x * (INT8_MAX / amax)
    codes = torch.where(xq >= 0, xq + 0.5, xq - 0.5).trunc()  # half away from zero, as the kernel
    return codes.reshape(B, H, -1, D), (amax / INT8_MAX * factor).reshape(B, H, -1)


def reference_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads_first: bool = False,
                            scale: float | None = None, block_m: int = 128, block_n: int = 128,
                            round_p: bool = True, smooth_k: bool = True) -> torch.Tensor:
    """The kernel's math in float32 PyTorch (any device): same quantization, same key blocks, same
    online softmax. Returns float32 in q's layout. ``round_p=False`` keeps P in fp32 (what the
    kernel does when run by Triton's interpreter, which has no FP8 dot); ``smooth_k=False`` quantizes
    K as it is (what the smoothing buys, for tests). ``fold`` changes only the kernel's rounding of
    the exp2 argument, below fp16's; the reference computes it as the plain configs do."""
    if not heads_first:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k, v = q.float(), k.float(), v.float()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    sm_scale = float(scale) if scale is not None else D ** -0.5
    q8, sq = _blocks(q, block_m, sm_scale * LOG2E)
    k8, sk = _blocks(k - k.mean(dim=2, keepdim=True) if smooth_k else k, block_n, 1.0)
    v_amax = v.abs().amax(dim=2, keepdim=True)
    sv = torch.where(v_amax > 0, v_amax / FP8_E4M3_MAX, torch.ones_like(v_amax))
    v8 = torch.nn.functional.pad((v / sv).to(torch.float8_e4m3fn).float(), (0, 0, 0, -Lk % block_n))
    q_scale = sq.repeat_interleave(block_m, dim=2)  # [B, H, Lq_pad]
    m = torch.full(q8.shape[:3], -math.inf, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros_like(q8)
    for j in range(k8.shape[2] // block_n):
        keys = slice(j * block_n, (j + 1) * block_n)
        s = (q8 @ k8[:, :, keys].transpose(-1, -2)) * (q_scale * sk[:, :, j, None])[..., None]
        cols = torch.arange(j * block_n, (j + 1) * block_n, device=q.device)
        s = s.masked_fill(cols >= Lk, -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - (m_new - P_EXPONENT_OFFSET)[..., None])
        l = l * alpha + p.sum(dim=-1)
        p8 = p.to(torch.float8_e4m3fn).float() if round_p else p
        acc = acc * alpha[..., None] + p8 @ v8[:, :, keys]
        m = m_new
    out = (acc / l[..., None] * sv)[:, :, :Lq]
    return out if heads_first else out.transpose(1, 2)


# -- the backend ------------------------------------------------------------------------------------

class Fp8AttentionBackend(AttentionBackend):
    name = "fp8"
    description = "SageAttention2-style Triton kernel: INT8 Q.K^T (K smoothed), FP8 P.V, fp32 softmax"
    config = None  # the launch config: None for the GPU's default (a benchmark may pick one, ``launch_config``)
    dtypes = KERNEL_DTYPES  # what the kernel reads

    def unavailable_reason(self, platform) -> str | None:
        return unavailable_reason(platform)

    def call_unsupported_reason(self, call: AttentionCall) -> str | None:
        reason = layout_reason(call.query, call.key, call.value, heads_first=False, dtypes=self.dtypes)
        return reason or short_keys_reason(call.key.shape[1], MIN_KEYS, "the FP8 kernel",
                                           "docs/benchmarks/attention_H200.json")

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return attention_fp8(call.query, call.key, call.value, scale=call.scale, config=self.config)

    def variant(self, platform) -> str:
        """The launch config a call runs on ``platform``."""
        return self.config or default_config(platform.capability or (0, 0))


BACKEND = Fp8AttentionBackend()


class Fp8ReferenceAttentionBackend(Fp8AttentionBackend):
    """``--attention fp8-reference``: the ``fp8`` backend's math, ``reference_attention_fp8`` with
    its launch config's blocks, in float32 PyTorch on any device, taking the calls the kernel would
    take (and fp32 ones) and handing back the others. What FP8 attention does to a model's output,
    measurable without the GPU (the GPU tests hold the kernel to this reference within 0.5%
    relative RMS); it is slow, and says nothing of speed."""

    name = "fp8-reference"
    description = "the fp8 backend's math in float32 PyTorch on any device: its quality, not its speed"
    dtypes = (*KERNEL_DTYPES, torch.float32)  # and fp32 models (a CPU run), quantized the same way

    def unavailable_reason(self, platform) -> str | None:
        return None

    def variant(self, platform) -> str:
        return f"the math of {self.config or DEFAULT_CONFIG}"

    def attention(self, call: AttentionCall) -> torch.Tensor:
        cfg = launch_config(self.config or DEFAULT_CONFIG)
        out = reference_attention_fp8(call.query, call.key, call.value, scale=call.scale, block_m=cfg["block_m"],
                                      block_n=cfg["block_n"])
        return out.to(call.query.dtype)


REFERENCE_BACKEND = Fp8ReferenceAttentionBackend()
