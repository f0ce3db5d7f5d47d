"""Fused FP8 linear: one-pass Triton activation quantization feeding torch._scaled_mm, and an
FP8-weight GEMV for inputs of a few rows.

Serves the builtin ``fp8`` family (HF fp8 checkpoints, ModelOpt FP8, online ``--quantization
fp8``) for per-tensor and per-channel weight scales; the weights, their layout and the GEMM call
are the builtin method's, only the activation quantization differs:
  static:   q = sat(x * (1 / input_scale))       (one elementwise pass)
  dynamic:  s = amax(|x_row|) / 448, q = sat(x * (1 / s))  (one pass per row, no separate amax pass)
Under torch.compile the PyTorch expressions are used instead, so Inductor can fuse the
quantization into the op that produced x (a norm, a modulation) rather than call an opaque kernel;
except per-token rows wider than WIDE_ROW, which go to the Triton kernel (see there).

Inputs of at most WEIGHT_ONLY_ROWS rows (the modulation linears on the timestep embedding, 76 per
FLUX step) keep 16-bit activations (diffgen.builtin.fp8) and go to kernels/fp8_gemv.py, eager and
compiled (through its operator): one kernel that reads the FP8 weight once for all rows.

In FLUX.1 blocks (diffgen.fused_blocks) the ops before most of these linears, LayerNorm +
modulation and GELU (+ the single block's concat), quantize their output in the same pass
(kernels/fp8_producers.py; bf16 activations only), so the linear gets FP8 directly. Compiled,
LayerNorm + modulation is left to Inductor, which fuses it as well as the kernel does; GELU +
concat stays the kernel's, through its operator. The QKV layer's method also runs the attention
prologue after it (RMSNorm of q and k, text rows first, RoPE) in one kernel
(kernels/qk_norm_rope.py), eager and compiled (its operator).
"""

from __future__ import annotations

import functools

import torch

from diffgen.builtin.fp8 import Fp8ScaledMMMethod, scaled_mm_unavailable_reason
from diffgen.platform import Platform, library
from diffgen.quant import LayerSpec, QuantConfig


def triton_unavailable_reason(platform: Platform) -> str | None:
    if platform.device_kind != "cuda":
        return f"the fused FP8 kernels are written for CUDA GPUs; this device is {platform.device_kind}"
    status = library("triton")
    if not status.available:
        return f"Triton is not importable ({status.reason}); pip install triton"
    return None


# Compiled, Inductor quantizes a row inside the kernel that produced it, which is best while the row
# fits one pass. A per-token row wider than this it reduced in a kernel of its own and then read a
# second time: FLUX's single-block proj_out input (4608 x 15360, the concat of the attention output
# and GELU(proj_mlp)) took 139 + 137 us per block that way on an H100, against 108 us for bf16 to
# write the concat and 72 us for the per-token kernel to quantize it. Sending such rows to the
# kernel made a compiled dynamic FLUX step 3.3-4.6 ms faster (98 vs 102-103 ms; the
# "no_wide_row_kernel" variant of docs/benchmarks/fp8_step_H100_run_a.json). FLUX.1's rewritten
# blocks now quantize that row in the GELU + concat producer; other models' wide rows come here.
WIDE_ROW = 8192


class Fp8TritonMethod(Fp8ScaledMMMethod):
    name = "fp8-triton-scaled-mm"
    kind = "native"
    priority = 10  # outranks the builtin method of the same kind: same GEMM, cheaper quantization
    # The kernels' operators, for compiled graphs; set once the weights are processed.
    wide_row_op = None  # per-token quantization
    gelu_concat_op = None  # GELU + concat + quantization
    gemv_op = None  # FP8-weight GEMV for few rows
    qk_norm_rope_op = None  # FLUX.1's attention prologue

    def __init__(self, config, layer, **kwargs):
        super().__init__(config, layer, **kwargs)
        # Producers for diffgen.fused_blocks. The kernels round intermediates as bf16 ops do, so
        # only for bf16 activations.
        self.fuses_producers = layer.dtype == torch.bfloat16

    def quantize_static(self, x, scale, dtype):
        if torch.compiler.is_compiling():
            return super().quantize_static(x, scale, dtype)
        return _kernels().quant.quant_fp8_static(x, scale, dtype)

    def quantize_per_token(self, x, dtype):
        if torch.compiler.is_compiling():
            if x.shape[-1] > WIDE_ROW and self.wide_row_op is not None:
                return self.wide_row_op(x, dtype)
            return super().quantize_per_token(x, dtype)
        return _kernels().quant.quant_fp8_per_token(x, dtype)

    def quantize_norm_modulate(self, layer, x, shift, scale, eps, keep_value):
        if torch.compiler.is_compiling():  # Inductor fuses LayerNorm, modulation and quantization
            return super().quantize_norm_modulate(layer, x, shift, scale, eps, keep_value)
        return _kernels().producers.norm_modulate_quant(x, shift, scale, eps, self._static_scale(layer),
                                                        layer.weight.dtype, keep_value)

    def quantize_gelu_concat(self, layer, a, h):
        static_scale = self._static_scale(layer)
        if not torch.compiler.is_compiling():
            return _kernels().producers.gelu_concat_quant(a, h, static_scale, layer.weight.dtype)
        if self.gelu_concat_op is None:
            return super().quantize_gelu_concat(layer, a, h)
        # Compiled too: on an H100, FLUX's 4608 x 15360 single-block input took Inductor 111 us static
        # and 240 us per-token against 99 and 100 us for the kernel (benchmarks/fp8_gelu_concat.py).
        q, s = self.gelu_concat_op(a, h, static_scale, layer.weight.dtype)
        return q, static_scale if self.static else s

    def _static_scale(self, layer):
        return layer.input_scale if self.static else None

    def process_weights_after_loading(self, layer):
        super().process_weights_after_loading(layer)
        # Registered by importing the kernels, which must happen outside a compiled region.
        if self.unavailable_reason is None:
            self.wide_row_op = _kernels().quant.quant_fp8_per_token_op
            self.gelu_concat_op = _kernels().producers.gelu_concat_quant_op
            self.gemv_op = _kernels().gemv.fp8_gemv_op
            self.qk_norm_rope_op = _kernels().prologue.qk_norm_rope_op

    def apply_weight_only(self, layer, x2, bias):
        if not torch.compiler.is_compiling():
            return _kernels().gemv.fp8_gemv(x2, layer.weight, layer.weight_scale, bias)
        if self.gemv_op is None:
            return super().apply_weight_only(layer, x2, bias)
        return self.gemv_op(x2, layer.weight, layer.weight_scale, bias)

    def qk_norm_rope(self, attn, qkv, context_qkv, image_rotary_emb):
        """(query, key, value) [B, S, H, D] of FLUX.1's attention prologue (diffgen.fused_blocks.
        qk_norm_rope) in one kernel, or None where the kernel does not apply to these inputs."""
        if self.unavailable_reason is not None:
            return None
        args = prologue_args(attn, qkv, context_qkv, image_rotary_emb)
        if args is None:
            return None
        compiling = torch.compiler.is_compiling()
        if compiling and self.qk_norm_rope_op is None:
            return None
        kernel = self.qk_norm_rope_op if compiling else _kernels().prologue.qk_norm_rope
        joint = context_qkv is not None
        out = kernel(qkv, context_qkv, *args, write_v=joint)
        query, key = out[0].transpose(1, 2), out[1].transpose(1, 2)
        # Single blocks: v needs no concatenation, and attention reads it in place.
        value = out[2].transpose(1, 2) if joint else qkv.chunk(3, dim=-1)[2].unflatten(-1, (-1, attn.head_dim))
        return query, key, value


def prologue_args(attn, qkv, context_qkv, image_rotary_emb):
    """(weights, cos, sin, eps) for the qk_norm_rope kernel, or None unless the block's tensors are
    what it computes on: bf16 on the GPU, torch.nn.RMSNorm with bf16 weights and one eps, a
    power-of-two head size, RoPE as (cos, sin) [S, D] tables."""
    joint = context_qkv is not None
    norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if joint else [])
    tensors = [qkv] + ([context_qkv] if joint else [])
    head_dim = attn.head_dim
    if not all(t.is_cuda and t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.dim() == 3
               and t.shape[::2] == qkv.shape[::2] for t in tensors):  # [B, S, 3 * H * D], one B and width
        return None
    if head_dim & (head_dim - 1) or head_dim > 256 or qkv.shape[-1] % (3 * head_dim):
        return None
    if not all(type(n) is torch.nn.RMSNorm and n.weight is not None and n.weight.shape == (head_dim,)
               and n.weight.dtype == torch.bfloat16 for n in norms):
        return None
    eps = [torch.finfo(qkv.dtype).eps if n.eps is None else n.eps for n in norms]
    if any(e != eps[0] for e in eps):
        return None
    cos = sin = None
    if image_rotary_emb is not None:
        if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
            return None
        cos, sin = image_rotary_emb
        seq = qkv.shape[1] + (context_qkv.shape[1] if joint else 0)
        if not all(isinstance(t, torch.Tensor) and t.shape == (seq, head_dim) and t.device == qkv.device
                   and t.is_floating_point() for t in (cos, sin)) or cos.stride(-1) != 1 or sin.stride() != cos.stride():
            return None
    return [n.weight for n in norms], cos, sin, eps[0]


@functools.cache
def _kernels():
    """The Triton modules, imported on first use (importing them imports Triton)."""
    from types import SimpleNamespace

    from .kernels import fp8_gemv, fp8_producers, fp8_quant, qk_norm_rope

    return SimpleNamespace(quant=fp8_quant, gemv=fp8_gemv, producers=fp8_producers, prologue=qk_norm_rope)


def offer(config: QuantConfig, layer: LayerSpec, platform: Platform) -> Fp8TritonMethod | None:
    """The fused method for one layer of the fp8 family, with the reason when it cannot run."""
    if config.family != "fp8" or config.scheme_for(layer.name) == "block":
        return None
    reason = triton_unavailable_reason(platform) or scaled_mm_unavailable_reason(config, layer, platform)
    if reason is None and layer.in_features > 32768:
        reason = f"the per-token kernel keeps a row in registers; K={layer.in_features} > 32768"
    return Fp8TritonMethod(config, layer, unavailable_reason=reason)
