"""FP8 attention on cuDNN's fused flash-attention kernel: the attention backend ``fp8-cudnn``
(``--attention fp8-cudnn``), a thin adapter over the cuDNN frontend's ``sdpa_fp8`` graph
(``pip install nvidia-cudnn-frontend``, imported as ``cudnn``; cuDNN 9.1+ on Hopper or Blackwell).

Why a second FP8 backend: diffgen-cuda's Triton kernel (``fp8``) reaches 1.2x PyTorch's cuDNN bf16
attention at video lengths and is slower at image lengths; cuDNN's own FP8 forward is a
warp-specialized Hopper kernel of the kind Triton does not generate.

The math (per-tensor scaling, as cuDNN's FP8 attention takes it):
  q8 = E4M3(q * 448 / amax(q)), likewise k8 and v8; descale_x = amax(x) / 448
  S  = q8 k8^T * descale_q * descale_k * attn_scale, in fp32; online softmax in fp32
  P  = exp(S - rowmax) * SCALE_S rounded to E4M3 (P <= 1, so P * 256 <= 448), P.V in FP8
  O  = P8 v8 * descale_s * descale_v / rowsum, written in bf16 where cuDNN builds that (9.13+ on
       Blackwell); on Hopper cuDNN writes O only in E4M3, so O is written times scale_o, a power of
       two with |O| * scale_o <= 224 (|O| <= amax(v), since each output row is a convex combination
       of v's rows), and multiplied back in bf16 (exact: a power of two)
q, k, v arrive in diffusers' [B, L, H, D] layout, which cuDNN reads as dims (b, h, s, d) with the
tensors' own strides: no transposes. The quantization is a pre-pass per tensor (a max reduction
and one Triton pass), on the device, with no host synchronization. ``reference_attention_cudnn_fp8``
is the same quantization with fp32 attention, for the GPU tests' error bounds.

We have run none of this on a GPU when it was written: the argument preparation is tested on the
CPU, the real calls are GPU tests that skip without a GPU or the frontend.
"""

from __future__ import annotations

import math
import threading

import torch

from diffgen.attention import AttentionBackend, AttentionCall
from diffgen.numerics.fp8 import dequantize_fp8, quantize_fp8_static

from .attention_fp8 import checked_call, compiled_as_eager, layout_reason, short_keys_reason

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_S = 256.0  # P in [0, 1] times a power of two below 448: exact descale, no overflow
MIN_CUDNN = 90100  # cuDNN's FP8 fused attention forward on Hopper
# Below this many keys the call (quantization passes included) was slower than cuDNN's bf16 SDPA on
# an H200: 0.55x at FLUX.1's 4,608, 0.79x at Qwen-Image's 7,145, 0.38x for Wan's 512 text keys;
# 1.42x at Wan 720p's 75,600 (docs/benchmarks/attention_cudnn_fp8_H200.json). Such calls fall back.
MIN_KEYS = 8192
_UIDS = dict(q=1, k=2, v=3, o=4, descale_q=5, descale_k=6, descale_v=7, descale_s=8, scale_s=9, scale_o=10,
             amax_s=11, amax_o=12)


def _frontend():
    """The cuDNN frontend module, or raise ImportError (also when a different ``cudnn`` is found)."""
    import cudnn

    if not hasattr(cudnn, "pygraph") or not hasattr(cudnn, "backend_version"):
        raise ImportError(f"the module 'cudnn' at {getattr(cudnn, '__file__', '?')} is not NVIDIA's cuDNN frontend")
    return cudnn


def unavailable_reason(platform) -> str | None:
    """None when cuDNN's FP8 attention runs on ``platform``; else why not, in words."""
    if platform.device_kind != "cuda":
        return f"cuDNN's FP8 attention runs on NVIDIA GPUs; this device is {platform.device_kind}"
    capability = platform.capability or (0, 0)
    if capability < (9, 0):
        return (f"cuDNN's FP8 fused attention runs on Hopper and Blackwell (SM90+); this GPU is "
                f"SM{capability[0]}{capability[1]} (the Triton backend `fp8` runs on SM89)")
    try:
        cudnn = _frontend()
    except Exception as exc:  # missing, or its libcudnn failed to load
        return f"the cuDNN frontend is not importable ({type(exc).__name__}: {exc}); pip install nvidia-cudnn-frontend"
    version = int(cudnn.backend_version())
    if version < MIN_CUDNN:
        return f"cuDNN {version} is loaded; its FP8 fused attention needs 9.1 or later"
    return None


def cudnn_dims_strides(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """cuDNN's (b, h, s, d) dims and strides for ``x`` in [B, L, H, D], whatever its strides."""
    b, s, h, d = x.shape
    sb, ss, sh, sd = x.stride()
    return (b, h, s, d), (sb, sh, ss, sd)


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, descale): E4M3 codes of ``x`` times 1 / descale, saturated at +-448, in x's strides, and
    descale = amax(x) / 448 as fp32 [1, 1, 1, 1] (1 for all zeros). On a GPU: one max reduction and
    one Triton pass (``kernels.fp8_quant``), no fp32 copy of x and no host synchronization."""
    amax = torch.linalg.vector_norm(x, ord=math.inf).float()
    # times the reciprocal, not a division: PyTorch divides by a scalar that way on a GPU and
    # exactly on the CPU, and the two must give the same descale bits
    descale = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    if x.is_cuda:
        from .fused import kernels

        quant = kernels().quant.quant_fp8_static
        if not x.is_contiguous() and x.transpose(1, 2).is_contiguous():  # [B, H, L, D] seen as [B, L, H, D]
            x8 = quant(x.transpose(1, 2), descale, FP8).transpose(1, 2)
        else:
            x8 = quant(x, descale, FP8)
    else:  # the same math in PyTorch ops (the CPU tests, the reference)
        x8 = quantize_fp8_static(x, descale, FP8)
    return x8, descale.reshape(1, 1, 1, 1)


def output_scale(descale_v: torch.Tensor) -> torch.Tensor:
    """scale_o for an E4M3 output: the power of two 2^floor(log2(0.5 / descale_v)). Every output
    row is a convex combination of v's rows, so |O| <= amax(v) = 448 descale_v and |O| scale_o <=
    224, half of E4M3's largest value (P's rounding can push the sum past amax(v) by a few percent);
    a power of two so that multiplying back in bf16 is exact."""
    return torch.exp2(torch.floor(torch.log2(0.5 / descale_v)))


class _Graphs:
    """Built graphs by layout (shared; the lock covers building), and cuDNN handles per thread and
    device (cuDNN does not share a handle between threads); execution binds the handle to the
    current stream."""

    def __init__(self):
        self.lock = threading.Lock()
        self.graphs: dict = {}
        self.local = threading.local()
        self.constants: dict = {}

    def handle(self, device: torch.device):
        handles = self.local.__dict__.setdefault("handles", {})
        if device.index not in handles:
            handles[device.index] = _frontend().create_handle()
        return handles[device.index]

    def constant(self, value: float, device: torch.device) -> torch.Tensor:
        key = (value, device.index)
        if key not in self.constants:
            self.constants[key] = torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)
        return self.constants[key]

    def get(self, q8, k8, v8, out_dtype: torch.dtype, attn_scale: float):
        """(graph, workspace bytes, output dtype) for operands of these layouts (the E4M3 operands,
        or the 16-bit ones they are quantized from: the quantization keeps the strides); raises
        RuntimeError, remembered, where cuDNN builds none."""
        key = (cudnn_dims_strides(q8), cudnn_dims_strides(k8), cudnn_dims_strides(v8), out_dtype, attn_scale,
               q8.device.index)
        with self.lock:
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._build(q8, k8, v8, out_dtype, attn_scale)
                except RuntimeError as exc:
                    self.graphs[key] = exc
            found = self.graphs[key]
        if isinstance(found, Exception):
            raise found
        return found

    def _build(self, q8, k8, v8, out_dtype, attn_scale):
        """(graph, workspace bytes, the output dtype cuDNN writes): ``out_dtype`` where this cuDNN
        builds it, else E4M3 (Hopper; ``run_quantized`` scales it back)."""
        errors = []
        for dtype in (out_dtype, FP8):
            try:
                graph = _sdpa_fp8_graph(_frontend(), self.handle(q8.device), q8, k8, v8, dtype, attn_scale)
                return graph, graph.get_workspace_size(), dtype
            except Exception as exc:  # not supported for this output type: try the next
                errors.append(f"{dtype}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise RuntimeError("cuDNN built no FP8 attention graph for q {} k {} ({})".format(
            tuple(q8.shape), tuple(k8.shape), "; ".join(errors)))


_GRAPHS = _Graphs()
_CUDNN_TYPES = {torch.bfloat16: "BFLOAT16", torch.float16: "HALF", FP8: "FP8_E4M3"}


def _sdpa_fp8_graph(cudnn, handle, q8, k8, v8, out_dtype, attn_scale):
    """cuDNN's FP8 SDPA forward for these operands' layouts, built and planned."""
    types = cudnn.data_type
    graph = cudnn.pygraph(io_data_type=types.FP8_E4M3, intermediate_data_type=types.FLOAT,
                          compute_data_type=types.FLOAT, handle=handle)
    tensors = {}
    for name, x in (("q", q8), ("k", k8), ("v", v8)):
        dims, strides = cudnn_dims_strides(x)
        tensors[name] = graph.tensor(uid=_UIDS[name], dim=dims, stride=strides, data_type=types.FP8_E4M3)
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        tensors[name] = graph.tensor(uid=_UIDS[name], dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=types.FLOAT)
    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=tensors["q"], k=tensors["k"], v=tensors["v"], descale_q=tensors["descale_q"],
        descale_k=tensors["descale_k"], descale_v=tensors["descale_v"], descale_s=tensors["descale_s"],
        scale_s=tensors["scale_s"], scale_o=tensors["scale_o"], generate_stats=False, attn_scale=attn_scale,
        use_causal_mask=False)
    b, lq, h, d = q8.shape
    o.set_uid(_UIDS["o"]).set_output(True).set_dim((b, h, lq, d)).set_stride((lq * h * d, d, h * d, 1))
    o.set_data_type(getattr(types, _CUDNN_TYPES[out_dtype]))
    for amax, name in ((amax_s, "amax_s"), (amax_o, "amax_o")):
        amax.set_uid(_UIDS[name]).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1))
        amax.set_data_type(types.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph


def graph_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> str | None:
    """None when cuDNN builds an FP8 attention graph for these operands' layouts (built once per
    layout and kept); else cuDNN's reason."""
    sm_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    try:
        _GRAPHS.get(q, k, v, q.dtype, sm_scale)
    except RuntimeError as exc:
        return str(exc)
    return None


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(x) for x in (q, k, v))
    return run_quantized(q8, k8, v8, dq, dk, dv, q.dtype, sm_scale)


def run_quantized(q8, k8, v8, dq, dk, dv, out_dtype: torch.dtype, sm_scale: float) -> torch.Tensor:
    """cuDNN's FP8 attention on operands already quantized (``quantize_per_tensor``); out
    [B, Lq, H, D] contiguous in ``out_dtype``."""
    cudnn = _frontend()
    graph, workspace_bytes, written = _GRAPHS.get(q8, k8, v8, out_dtype, sm_scale)
    device = q8.device
    b, lq, h, d = q8.shape
    out = torch.empty((b, lq, h, d), dtype=written, device=device)
    scale_o = output_scale(dv) if written == FP8 else _GRAPHS.constant(1.0, device)
    amax = torch.empty(2, dtype=torch.float32, device=device)
    pack = {_UIDS["q"]: q8, _UIDS["k"]: k8, _UIDS["v"]: v8, _UIDS["o"]: out,
            _UIDS["descale_q"]: dq, _UIDS["descale_k"]: dk, _UIDS["descale_v"]: dv,
            _UIDS["descale_s"]: _GRAPHS.constant(1.0 / SCALE_S, device),
            _UIDS["scale_s"]: _GRAPHS.constant(SCALE_S, device), _UIDS["scale_o"]: scale_o,
            _UIDS["amax_s"]: amax[0:1], _UIDS["amax_o"]: amax[1:2]}
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
    handle = _GRAPHS.handle(device)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    graph.execute(pack, workspace, handle=handle)
    if written == FP8:
        return out.to(out_dtype).mul_(scale_o.reciprocal().to(out_dtype).reshape(()))
    return out


_call = compiled_as_eager("attention_cudnn_fp8", _run)


def attention_cudnn_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v by cuDNN's FP8 kernel; q [B, Lq, H, D], k and v [B, Lk, H, D], bf16
    or fp16; out [B, Lq, H, D] contiguous in q's dtype. ``scale`` defaults to D ** -0.5."""
    return checked_call("attention_cudnn_fp8", _call, q, k, v, scale)


def reference_attention_cudnn_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  scale: float | None = None) -> torch.Tensor:
    """What the per-tensor FP8 operands alone cost: q, k, v through ``quantize_per_tensor`` and
    back, then attention in fp32 (P not rounded; cuDNN rounds it to E4M3, which the GPU tests bound
    separately). float32 [B, Lq, H, D], any device."""
    deq = [dequantize_fp8(x8, descale.reshape(())).transpose(1, 2)
           for x8, descale in (quantize_per_tensor(x) for x in (q, k, v))]
    sm_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    s = deq[0] @ deq[1].transpose(-1, -2) * sm_scale
    return (torch.softmax(s, dim=-1) @ deq[2]).transpose(1, 2)


class CudnnFp8AttentionBackend(AttentionBackend):
    name = "fp8-cudnn"
    description = "cuDNN's fused FP8 flash attention (nvidia-cudnn-frontend): per-tensor E4M3 Q, K, V and P"

    def unavailable_reason(self, platform) -> str | None:
        return unavailable_reason(platform)

    def call_unsupported_reason(self, call: AttentionCall) -> str | None:
        q, k, v = call.query, call.key, call.value
        reason = layout_reason(q, k, v, heads_first=False)
        if reason is None:
            reason = short_keys_reason(k.shape[1], MIN_KEYS, "cuDNN's FP8 attention",
                                       "docs/benchmarks/attention_cudnn_fp8_H200.json")
        if reason is None and not torch.compiler.is_compiling():  # eager: cuDNN says whether it builds this
            reason = graph_reason(q, k, v, call.scale)
        return reason

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return attention_cudnn_fp8(call.query, call.key, call.value, scale=call.scale)


BACKEND = CudnnFp8AttentionBackend()
