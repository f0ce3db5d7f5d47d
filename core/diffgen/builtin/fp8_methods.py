"""The fp8 family's linear methods: the PyTorch reference and ``torch._scaled_mm``.

Tensors per quantized linear (names as in HF / vLLM fp8 checkpoints):
  weight            float8_e4m3fn [N, K]
  weight_scale      fp32 () or [1] (per-tensor), or [N] / [N, 1] (per-channel)
  weight_scale_inv  fp32 [ceil(N/128), ceil(K/128)] (128x128 blocks; despite the name, a multiplier)
  input_scale       fp32 () (only with ``activation_scheme: "static"``)
Forward: y = (q(x) * s_x) @ (W_fp8 * s_w)^T + b, where q(x) is per-tensor with the static
input_scale, per-token (dynamic, one scale per row) or per 1x128 group (block checkpoints).
An input of at most WEIGHT_ONLY_ROWS rows is not quantized (per-tensor and per-channel weights):
y = x @ (W_fp8 * s_w)^T + b, the static input_scale unused. Online quantization receives the
16-bit weight and quantizes it with the config's scheme (per-channel unless asked otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linear import (LinearMethod, QuantLinear, ShardError, TensorShard, check_scales, gelu_concat, norm_modulate,
                      register_weight)
from ..numerics.fp8 import (
    dequantize_fp8,
    dequantize_fp8_block,
    fp8_e4m3fn_to_e4m3fnuz,
    per_channel_scale,
    per_tensor_scale,
    quantize_fp8,
    quantize_fp8_block,
    quantize_fp8_per_token,
    quantize_fp8_static,
)
from ..platform import Platform
from ..quant import LayerSpec, QuantConfig

FP8 = torch.float8_e4m3fn
SCHEMES = ("per-channel", "per-tensor", "block")
BLOCK = (128, 128)
# Inputs of at most this many rows keep their 16-bit activations; only the weight is FP8. These are
# the modulation linears on the timestep embedding (one row per sample; FLUX.1 has 76 per step, 27%
# of its weights). Such a GEMM is bound by reading the weight, so quantizing the row saves no time,
# while its error reaches every token alike (shift, scale and gate of a whole block): keeping them
# 16-bit raised a FLUX.1-dev-sized step's cosine to bf16 from 0.9895 to 0.9919 (static scales,
# benchmarks/fp8_step.py).
# Four rows: a batch of two with classifier-free guidance; token-wise linears have far more.
WEIGHT_ONLY_ROWS = 4


def quantize_weight(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """The tensors (suffix -> tensor) a 16-bit weight becomes in an fp8 checkpoint."""
    if scheme == "block":
        q, s = quantize_fp8_block(w, BLOCK)
        return {"weight": q, "weight_scale_inv": s}
    if scheme == "per-tensor":
        scale = per_tensor_scale(w)
        return {"weight": quantize_fp8(w, scale), "weight_scale": scale.reshape(())}
    scale = per_channel_scale(w)
    return {"weight": quantize_fp8(w, scale[:, None]), "weight_scale": scale}


def _scale_numel(scheme: str, out_features: int, in_features: int) -> int:
    if scheme == "block":
        return -(-out_features // BLOCK[0]) * -(-in_features // BLOCK[1])
    return out_features if scheme == "per-channel" else 1


class Fp8Method(LinearMethod):
    """Weights and their preparation, shared by the reference and the _scaled_mm method."""

    def __init__(self, config: QuantConfig, layer: LayerSpec, **kwargs):
        super().__init__(config, layer, **kwargs)
        # Resolved once: the forward must not look anything up by layer name, or torch.compile
        # guards on the name and recompiles every block.
        self.scheme = config.scheme_for(layer.name) or "per-tensor"
        self.static = config.param("activation_scheme") == "static"
        self.block = tuple(config.param("block", BLOCK))

    def weight_only(self, rows: int) -> bool:
        """Whether an input of ``rows`` rows keeps 16-bit activations (WEIGHT_ONLY_ROWS). Block-scaled
        layers quantize every input: their 1x128 activation groups are fine-grained already."""
        return rows <= WEIGHT_ONLY_ROWS and self.scheme != "block"

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        if self.config.online:  # 16-bit weight arrives; process_weights_after_loading quantizes it
            register_weight(layer, "weight", (out_features, in_features), dtype)
            return
        register_weight(layer, "weight", (out_features, in_features), FP8)
        if self.scheme == "block":
            bn, bk = self.block
            register_weight(layer, "weight_scale_inv", (-(-out_features // bn), -(-in_features // bk)), torch.float32)
        elif self.scheme == "per-channel":
            register_weight(layer, "weight_scale", (out_features,), torch.float32)
        else:
            register_weight(layer, "weight_scale", (), torch.float32)
        if self.static:
            register_weight(layer, "input_scale", (), torch.float32)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        if self.config.online and layer.weight.dtype != FP8:
            for key, t in quantize_weight(layer.weight.data, self.scheme).items():
                setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
        if hasattr(layer, "weight_scale") and self.scheme == "per-channel":
            layer.weight_scale.data = layer.weight_scale.data.reshape(-1)
        check_scales(layer, "weight_scale", "weight_scale_inv", "input_scale")

    def fuse(self, layers: list[QuantLinear], name: str) -> QuantLinear | None:
        """Concatenate along N. Exact: activations are quantized per token (the same scale for every
        part, they share the input) or with one static scale, which must then be the same for all
        parts (ModelOpt calibrates Q, K and V on the same input, so it is). Per-tensor weight scales
        that differ become a per-channel vector. Block scales and unprocessed weights are not fused."""
        methods = [layer.method for layer in layers]
        if (self.scheme == "block" or any(type(m) is not type(self) for m in methods)
                or any(m.scheme != self.scheme or m.static != self.static for m in methods)
                or any(layer.weight.dtype != FP8 for layer in layers)  # online before quantizing, or ROCm's fnuz
                or len({layer.bias is None for layer in layers}) > 1):
            return None
        first = layers[0]
        if self.static and not all(torch.equal(layer.input_scale, first.input_scale) for layer in layers):
            return None
        scales = [layer.weight_scale.reshape(-1) for layer in layers]
        scheme = self.scheme
        if scheme == "per-tensor" and not all(torch.equal(s, scales[0]) for s in scales):
            scheme = "per-channel"
        spec = LayerSpec(name, first.in_features, sum(layer.out_features for layer in layers),
                         first.bias is not None, first.compute_dtype)
        method = type(self)(self.config, spec)
        method.scheme = scheme
        with torch.device("meta"):
            fused = QuantLinear(spec, method, dtype=first.compute_dtype)

        def param(t):
            return torch.nn.Parameter(t, requires_grad=False)

        fused.weight = param(torch.cat([layer.weight.data for layer in layers]))
        if scheme == "per-tensor":
            fused.weight_scale = param(first.weight_scale.data.clone())
        else:
            fused.weight_scale = param(torch.cat([s.expand(layer.out_features)
                                                  for s, layer in zip(scales, layers)]).float())
        if self.static:
            fused.input_scale = param(first.input_scale.data.clone())
        if first.bias is not None:
            fused.bias = param(torch.cat([layer.bias.data for layer in layers]))
        method.process_weights_after_loading(fused)
        return fused

    def tp_shards(self, style: str, size: int) -> dict[str, TensorShard]:
        """Column-parallel: the weight's rows with their per-channel scales or their rows of
        128x128 block scales (whole blocks per rank). Row-parallel: the weight's columns with their
        columns of block scales; per-channel and per-tensor scales multiply whole output rows and
        stay whole. The static input scale is one number, the same on every rank."""
        if self.config.online and self.scheme == "per-tensor":
            raise ShardError(f"{self.name}: online per-tensor FP8 would quantize each rank's slice with its own "
                             f"scale, not the scale of the whole weight ({self.layer.name}); quantize per-channel")
        bn, bk = self.block
        if style == "colwise":
            # online: the scales exist once the weight is quantized (a split at run time slices them)
            shards = {"weight": TensorShard(0, bn if self.scheme == "block" else 1), "bias": TensorShard(0)}
            if self.scheme == "block":
                shards["weight_scale_inv"] = TensorShard(0)
            elif self.scheme == "per-channel":
                shards["weight_scale"] = TensorShard(0)
            return shards
        if style == "rowwise":
            shards = {"weight": TensorShard(1, bk if self.scheme == "block" else 1)}
            if self.scheme == "block":
                shards["weight_scale_inv"] = TensorShard(1)
            return shards
        raise ShardError(f"{self.name}: unknown tensor-parallel style {style!r} ({self.layer.name})")

    def weight_bytes(self, layer: QuantLinear) -> int:
        if self.config.online and layer.weight.dtype != FP8:  # planned, not yet quantized
            n, k = layer.weight.shape
            bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
            return n * k + 4 * _scale_numel(self.scheme, n, k) + bias
        return super().weight_bytes(layer)


def _quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-``group``-column activation quantization (the 1x128 block recipe)."""
    m, k = x.shape
    pad = -k % group
    xp = F.pad(x.float(), (0, pad)).reshape(m, -1, group)
    q, s = quantize_fp8_per_token(xp)
    return q.reshape(m, -1)[:, :k], s.reshape(m, -1)


def _dequantize_groups(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    m, k = q.shape
    qp = F.pad(q.float(), (0, -k % group)).reshape(m, -1, group)
    return dequantize_fp8(qp, s[..., None]).reshape(m, -1)[:, :k]


class Fp8ReferenceMethod(Fp8Method):
    """Plain PyTorch: the same activation quantization as the kernel, then an fp32 matmul."""

    name = "fp8-reference"
    kind = "reference"

    def apply(self, layer, x, bias):
        x2 = x.reshape(-1, x.shape[-1])
        if self.scheme == "block":
            bn, bk = self.block
            w = dequantize_fp8_block(layer.weight, layer.weight_scale_inv, (bn, bk))
            xd = _dequantize_groups(*_quantize_groups(x2, bk), bk)
        else:
            scale = layer.weight_scale
            w = dequantize_fp8(layer.weight, scale.reshape(-1, 1) if scale.numel() > 1 else scale)
            if self.weight_only(x2.shape[0]):
                xd = x2.float()
            elif self.static:
                xd = dequantize_fp8(quantize_fp8_static(x2, layer.input_scale), layer.input_scale)
            else:
                q, s = quantize_fp8_per_token(x2)
                xd = dequantize_fp8(q, s)
        y = F.linear(xd, w, None if bias is None else bias.float())
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Fp8ScaledMMMethod(Fp8Method):
    """torch._scaled_mm with per-tensor, row-wise or 128x128-block scales (no host sync).

    It implements ``PreparedInputMethod`` (a prepared input is ``(q, scale_a)``) with PyTorch ops:
    the reference a kernel plugin's one-pass producers are tested against. They gain nothing over
    the unfused ops, so this method does not ask for prepared inputs (``prepared_inputs``); a
    subclass with fused kernels does."""

    name = "fp8-scaled-mm"
    kind = "native"
    prepared_inputs: bool = False

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        if layer.weight.device.type == "cuda" and torch.version.hip:
            scale_name = "weight_scale_inv" if self.scheme == "block" else "weight_scale"
            q, s = fp8_e4m3fn_to_e4m3fnuz(layer.weight.data, getattr(layer, scale_name).data)
            layer.weight.data, getattr(layer, scale_name).data = q, s
        if self.scheme != "block":
            # Row-wise scales for the weight operand: [1, N], fp32, contiguous.
            s = layer.weight_scale.data.float().reshape(1, -1)
            layer.register_buffer("_scale_b", s.expand(1, layer.out_features).contiguous(), persistent=False)

    def tp_shards(self, style: str, size: int) -> dict[str, TensorShard]:
        """As Fp8Method, plus the [1, N] row-wise scale buffer process_weights_after_loading derived
        from the weight scale: it follows the weight's rows."""
        shards = super().tp_shards(style, size)
        if style == "colwise" and self.scheme != "block":
            shards["_scale_b"] = TensorShard(1)
        return shards

    # Activation quantization, in plain PyTorch ops; a kernel plugin overrides these with fused
    # kernels and inherits everything else.
    def quantize_static(self, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return quantize_fp8_static(x, scale, dtype)

    def quantize_per_token(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_per_token(x, dtype)

    def quantize_input(self, layer: QuantLinear, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale_a) of a 2-D input: the static input_scale, or one scale per row."""
        if self.static:
            return self.quantize_static(x2, layer.input_scale, layer.weight.dtype), layer.input_scale
        return self.quantize_per_token(x2, layer.weight.dtype)

    # -- PreparedInputMethod ----------------------------------------------------------------
    def takes_prepared_input(self, layer: QuantLinear, rows: int | None) -> bool:
        return (self.prepared_inputs and self.scheme != "block"
                and (rows is None or not self.weight_only(rows)))

    def shares_prepared_input(self, layer: QuantLinear, other: QuantLinear) -> bool:
        theirs = getattr(other, "method", None)
        if type(theirs) is not type(self) or theirs.static != self.static or layer.weight.dtype != other.weight.dtype:
            return False
        return not self.static or torch.equal(layer.input_scale, other.input_scale)

    def prepare_norm_modulate(self, layer, x, shift, scale, eps, keep_value):
        y = norm_modulate(x, shift, scale, eps)
        return self.quantize_input(layer, y.reshape(-1, y.shape[-1])), y if keep_value else None

    def prepare_gelu_concat(self, layer, a, h):
        y = gelu_concat(a, h)
        return self.quantize_input(layer, y.reshape(-1, y.shape[-1]))

    def apply_prepared(self, layer: QuantLinear, prepared, bias, out_dtype: torch.dtype) -> torch.Tensor:
        """The GEMM on ``(q, scale_a)`` from quantize_input or a producer: [M, K] -> [M, N]."""
        q, scale_a = prepared
        if self.static and self.scheme == "per-tensor":
            return torch._scaled_mm(q, layer.weight.t(), scale_a=scale_a, scale_b=layer.weight_scale,
                                    bias=bias, out_dtype=out_dtype, use_fast_accum=True)
        if self.static:
            scale_a = scale_a.reshape(1, 1).expand(q.shape[0], 1).contiguous()
        return torch._scaled_mm(q, layer.weight.t(), scale_a=scale_a, scale_b=layer._scale_b,
                                bias=bias, out_dtype=out_dtype, use_fast_accum=True)

    def apply_weight_only(self, layer: QuantLinear, x2: torch.Tensor, bias) -> torch.Tensor:
        """[M, K] 16-bit input, not quantized (weight_only): the FP8 weight widened to x's dtype
        (exact), the weight scale and bias applied in fp32. A kernel plugin replaces this with one
        that reads the FP8 weight directly."""
        y = F.linear(x2, layer.weight.to(x2.dtype)).float() * layer.weight_scale.reshape(-1)
        return (y if bias is None else y + bias.float()).to(x2.dtype)

    def apply(self, layer, x, bias):
        x2 = x.reshape(-1, x.shape[-1])
        if self.weight_only(x2.shape[0]):
            return self.apply_weight_only(layer, x2, bias).reshape(*x.shape[:-1], -1)
        if self.scheme != "block":
            y = self.apply_prepared(layer, self.quantize_input(layer, x2), bias, x.dtype)
            return y.reshape(*x.shape[:-1], -1)
        bn, bk = self.block
        rows = x2.shape[0]
        # cuBLASLt wants the scales' leading dimensions 16-byte aligned: M for the 1x128
        # activation scales (it refuses otherwise), K/128 for the weight's (checked at plan time).
        x2 = F.pad(x2, (0, 0, 0, -rows % 4))
        q, s = _quantize_groups(x2, bk)
        y = torch._scaled_mm(q.to(layer.weight.dtype), layer.weight.t(), scale_a=s.t().contiguous().t(),
                             scale_b=layer.weight_scale_inv.t(), out_dtype=x.dtype)[:rows]
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], -1)


def scaled_mm_platform_reason(platform: Platform) -> str | None:
    """Why torch._scaled_mm cannot run on ``platform``, or None: it runs on CUDA SM89 and SM90+,
    and on ROCm MI300-class GPUs (gfx94x / gfx95x)."""
    if platform.device_kind == "cuda" and platform.capability is not None:
        if platform.capability >= (9, 0) or platform.capability == (8, 9):
            return None
        major, minor = platform.capability
        return f"torch._scaled_mm needs SM89 or SM90+, this GPU ({platform.device_name}) is SM{major}{minor}"
    if platform.device_kind == "rocm":
        if platform.gfx_arch and platform.gfx_arch.startswith(("gfx94", "gfx95")):
            return None
        return f"FP8 GEMMs need an MI300-class GPU (gfx94x/gfx95x), this one is {platform.gfx_arch}"
    return f"FP8 GEMMs need a CUDA SM89+ or ROCm MI300 GPU; this device is {platform.device_kind}"


def scaled_mm_unavailable_reason(config: QuantConfig, layer: LayerSpec, platform: Platform) -> str | None:
    reason = scaled_mm_platform_reason(platform)
    if reason is not None:
        return reason
    if config.scheme_for(layer.name) == "block":
        # Measured on an H100 (torch 2.11, cuBLAS 13): with K/128 not a multiple of 4 the weight
        # scales' leading dimension is misaligned and cuBLASLt returns WRONG results silently
        # (K=384, 640); N must be whole blocks.
        if layer.in_features % 512 or layer.out_features % 128:
            return (f"torch._scaled_mm with 128x128 blocks needs K divisible by 512 and N by 128; "
                    f"{layer.name} is K={layer.in_features}, N={layer.out_features}")
    elif layer.in_features % 16 or layer.out_features % 16:
        return (f"torch._scaled_mm needs K and N divisible by 16; {layer.name} is "
                f"K={layer.in_features}, N={layer.out_features}")
    if layer.dtype not in (torch.bfloat16, torch.float16):
        return f"FP8 GEMMs output bf16/fp16; the compute dtype is {layer.dtype}"
    return None
