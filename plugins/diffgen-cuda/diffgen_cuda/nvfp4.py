"""NVFP4 linears: ModelOpt's NVFP4 (W4A4) and W4A16_NVFP4 exports, and their reference method.

Tensors per quantized linear (``export_hf_checkpoint``; K padded up to Kp, a multiple of 16):
  weight          uint8 [N, Kp/2]           E2M1 codes, element 2i in the low nibble
  weight_scale    float8_e4m3fn [N, Kp/16]  one per 16-element block, row-major
  weight_scale_2  fp32 ()                   global dequant multiplier, w_amax / (6 * 448)
  input_scale     fp32 ()                   W4A4 only: calibrated activation amax / (6 * 448)
Forward (``diffgen.numerics.nvfp4``): y = q(x) @ W^T + b with W = e2m1 * weight_scale *
weight_scale_2; q rounds the activations to NVFP4 block by block with input_scale as their global
scale (W4A4; ``w4a4-dynamic``, for layers exported without an input_scale, takes the global scale
from each input's amax), and leaves them 16-bit for W4A16.

NVFP4_AWQ and NVFP4_SVD exports (ModelOpt's ``awq_lite`` and ``svdquant`` algorithms; the latter is
its diffusers example's ``--quant-algo svdquant``) add a smoothing per layer and, for SVD, a
low-rank branch (``extras.py``): y = q(xs) @ W^T + b + (xs @ lora_a^T) @ lora_b^T with
xs = x * pre_quant_scale, W the smoothed weight less lora_b @ lora_a, input_scale the smoothed
input's. Every method here computes them the same way around its own 4-bit GEMM (``linear``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from diffgen.errors import LoadError
from diffgen.linear import (LinearMethod, QuantLinear, TensorShard, check_scales, packed4_tp_shards,
                            register_weight)
from diffgen.numerics.e2m1 import E2M1_MAX
from diffgen.numerics.fp8 import FP8_E4M3_MAX
from diffgen.numerics.e2m1 import swap_nibbles
from diffgen.numerics.nvfp4 import BLOCK, dequantize_nvfp4, fake_quantize_nvfp4, swizzled_to_linear_scales
from diffgen.quant import LayerSpec, QuantConfig, TensorStream

from .extras import LORA_A, LORA_B, SMOOTHING, Extras

FAMILY = "nvfp4"
SCHEMES = ("w4a4", "w4a16", "w4a4-dynamic")
E4M3 = torch.float8_e4m3fn


def padded_k(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def nvfp4_layers(source) -> dict[str, str]:
    """Layers the tensors show as NVFP4: name -> "w4a4" (with input_scale) or "w4a4-dynamic", or
    "group G" when the block scales cover more than 16 elements each (fewer scale columns than a
    16-element grid needs; more are padding, as ModelOpt's ``padding_strategy`` writes)."""
    tensors = source.tensors
    out = {}
    for name, info in tensors.items():
        if not (name.endswith(".weight") and info.dtype == torch.uint8 and len(info.shape) == 2):
            continue
        prefix = name[: -len(".weight")]
        scale, scale_2 = tensors.get(f"{prefix}.weight_scale"), tensors.get(f"{prefix}.weight_scale_2")
        if scale is None or scale_2 is None or scale.dtype != E4M3 or len(scale.shape) != 2:
            continue
        if scale.shape[1] < -(-2 * info.shape[1] // BLOCK):
            out[prefix] = f"group {2 * info.shape[1] // scale.shape[1] if scale.shape[1] else 0}"
        else:
            out[prefix] = "w4a4" if f"{prefix}.input_scale" in tensors else "w4a4-dynamic"
    return out


def _tiled(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // 128) * 128, -(-cols // 4) * 4


def scale_layout(source, layers) -> tuple[str | None, str]:
    """How the ``layers``' block scales are stored, as far as their shapes tell: "swizzled" (a scale
    stored in the 128x4-tiled shape, rows padded past its weight's: ModelOpt's
    ``enable_swizzle_layout``), "linear" (a scale that cannot be tiled), or None when every shape
    fits both (rows a multiple of 128, columns of 4: every layer of FLUX.1, Wan2.2 and Qwen-Image);
    and the layer that says so. ``source``: the file as stored (the layout pass may already have put
    the scales whose shapes betray their tiles in rows)."""
    found = {}
    for prefix in layers:
        weight, scale = source.tensors.get(f"{prefix}.weight"), source.tensors.get(f"{prefix}.weight_scale")
        if weight is None or scale is None or len(weight.shape) != 2 or len(scale.shape) != 2:
            continue
        wr, (sr, sc) = weight.shape[0], scale.shape
        if sr != wr and (sr, sc) == _tiled(sr, sc) and wr <= sr < wr + 128:
            found.setdefault("swizzled", f"{prefix}.weight_scale is stored [{sr}, {sc}] for a weight of {wr} rows")
        elif sr == wr and (sr, sc) != _tiled(sr, sc):
            found.setdefault("linear", f"{prefix}.weight_scale is stored [{sr}, {sc}], not in 128x4 tiles")
    if len(found) != 1:
        return None, "; ".join(found.values())  # neither, or a file whose layers disagree
    return next(iter(found.items()))


def _unpadded(name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``tensor`` cut to ``shape`` when what lies past it is zero padding (ModelOpt's
    ``padding_strategy`` pads rows and columns to 16 and the tiled scales to 128x4)."""
    rows, cols = shape
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.dim() != 2 or tensor.shape[0] < rows or tensor.shape[1] < cols:
        return tensor  # the loader names the shape that does not fit
    bits = tensor.view(torch.uint8)
    if bits[rows:].any() or bits[:, cols:].any():
        raise LoadError(f"{name} is stored {list(tensor.shape)} for a layer that needs {list(shape)}, and what lies "
                        "past that is not zero: not padding, so the tensor belongs to another shape of layer")
    return tensor[:rows, :cols].contiguous()


def runtime_layout(tensors: TensorStream, config: QuantConfig, target) -> TensorStream:
    """Exports that differ from ModelOpt's plain layout become it: nibbles packed high-first
    (``swap_weight_nibbles``, SGLang's key) swapped; block scales stored 128x4-tiled
    (``weight_scale_layout: swizzled``: SGLang's ``checkpoint_weight_scale_layout``, ComfyUI's files,
    ModelOpt's ``enable_swizzle_layout``) put back in rows; weights and scales padded past the
    layer's shape (ModelOpt's ``padding_strategy``) cut back, the padding checked to be zeros."""
    swap = bool(config.param("swap_weight_nibbles"))
    swizzled = config.param("weight_scale_layout") == "swizzled"
    for name, tensor in tensors:
        want = target.expected.get(name)
        if name.endswith(".weight") and tensor.dtype == torch.uint8:
            if swap:
                tensor = swap_nibbles(tensor)
            if want is not None and len(want[0]) == 2:
                tensor = _unpadded(name, tensor, want[0])
        elif name.endswith(".weight_scale") and tensor.dtype == E4M3 and want is not None and len(want[0]) == 2:
            rows, cols = want[0]
            if swizzled and tensor.dim() == 2 and tensor.shape[0] % 128 == 0 and tensor.shape[1] % 4 == 0 \
                    and tensor.shape[0] >= rows and tensor.shape[1] >= cols:
                tensor = swizzled_to_linear_scales(tensor, *tensor.shape)
            elif swizzled and tensor.numel() == _tiled(rows, cols)[0] * _tiled(rows, cols)[1]:
                tensor = swizzled_to_linear_scales(tensor.reshape(_tiled(rows, cols)), *_tiled(rows, cols))
            tensor = _unpadded(name, tensor, (rows, cols))
        yield name, tensor


class Nvfp4Method(Extras, LinearMethod):
    """The stored tensors, shared by every NVFP4 method; each method's GEMM is its ``linear``, the
    extras (``extras.py``) go around it."""

    def __init__(self, config: QuantConfig, layer: LayerSpec, **kwargs):
        super().__init__(config, layer, **kwargs)
        # Looked up once: read in forward by the layer's name, it made torch.compile guard on each
        # layer's name and recompile per block until its limit (then run the rest eagerly).
        self.scheme = config.scheme_for(layer.name) or "w4a4"
        self.init_extras(config, layer.name)

    def create_weights(self, layer: QuantLinear, in_features: int, out_features: int, dtype) -> None:
        kp = padded_k(in_features)
        register_weight(layer, "weight", (out_features, kp // 2), torch.uint8)
        register_weight(layer, "weight_scale", (out_features, kp // BLOCK), E4M3)
        register_weight(layer, "weight_scale_2", (), torch.float32)
        if self.scheme == "w4a4":
            register_weight(layer, "input_scale", (), torch.float32)
        self.create_extras(layer, in_features, out_features, dtype)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        check_scales(layer, "weight_scale_2", "input_scale")
        check_scales(layer, "weight_scale", zero_ok=True)
        self.prepare_extras(layer)

    # Tensors process_weights_after_loading derives per output row: name -> the axis that runs
    # along N. None here: these methods read the checkpoint's tensors as they are.
    tp_derived: dict[str, int] = {}

    def tp_shards(self, style: str, size: int) -> dict[str, TensorShard]:
        """Column-parallel: the rows of weight, weight_scale and bias (and of each derived per-row
        tensor). Row-parallel: the packed weight's columns in whole 16-element blocks (8 bytes) and
        the matching weight_scale columns; per-row derived tensors stay whole. weight_scale_2 and
        input_scale are one number each, the same on every rank.

        Numbers: every rank dequantizes its elements with the scales the whole layer stored, so
        they equal one process's. W4A4 with a static input_scale rounds each 16-element block of
        the activations alike on a K slice too: only the order of summation changes (row-parallel:
        two partial GEMMs, all-reduced). ``w4a4-dynamic`` row-parallel takes the activations'
        global scale from the amax of the rank's own K slice, which is at most the whole input's:
        a finer grid than one process's, not the same numbers."""
        if self.has_extras:
            raise self.split_refusal("NVFP4")
        return packed4_tp_shards(self, style, size, BLOCK, "NVFP4 blocks")

    # -- fusion ----------------------------------------------------------------------------
    # The per-row buffers a native method derives (``process_weights_after_loading``), the global
    # scale among them as ``_row_global``: layers with different global scales then fuse by
    # concatenating rows. Empty: the method does not fuse.
    row_buffers: ClassVar[tuple[str, ...]] = ()

    def fuse(self, layers: list[QuantLinear], name: str) -> QuantLinear | None:
        """Concatenate along N: every per-row quantity (codes, block scales, ``row_buffers``, the
        low-rank branch's up projection) stays with its row, and the activations are treated alike
        for every part (per token, or left 16-bit), so the fused layer computes each part's numbers.
        Parts with extras fuse only when they share the smoothing and the branch's down projection
        (ModelOpt's export re-solves the Q/K/V it fuses so that they do)."""
        if (not self.row_buffers or any(type(layer.method) is not type(self) or not hasattr(layer, "_row_global")
                                        for layer in layers)
                or len({layer.bias is None for layer in layers}) > 1
                or len({(layer.in_features, layer.weight.shape[1]) for layer in layers}) > 1
                or not _shared_extras(layers)):
            return None
        first = layers[0]
        spec = LayerSpec(name, first.in_features, sum(layer.out_features for layer in layers),
                         first.bias is not None, first.compute_dtype)
        method = self.fused_method(spec)
        method.smoothed, method.rank = self.smoothed, self.rank  # the config names the parts, not the fused layer
        with torch.device("meta"):
            fused = QuantLinear(spec, method, dtype=first.compute_dtype)

        def cat(attr):
            return torch.cat([getattr(layer, attr).data.reshape(layer.out_features, -1) for layer in layers])

        for attr in ("weight", "weight_scale") + ((LORA_B,) if self.rank else ()):
            setattr(fused, attr, torch.nn.Parameter(cat(attr), requires_grad=False))
        for attr in ((SMOOTHING,) if self.smoothed else ()) + ((LORA_A,) if self.rank else ()):
            setattr(fused, attr, torch.nn.Parameter(getattr(first, attr).data, requires_grad=False))
        fused.weight_scale_2 = torch.nn.Parameter(first.weight_scale_2.data.clone(), requires_grad=False)  # unused
        if first.bias is not None:
            fused.bias = torch.nn.Parameter(cat("bias").reshape(-1), requires_grad=False)
        if hasattr(fused, "input_scale"):
            fused.input_scale = torch.nn.Parameter(first.input_scale.data.clone(), requires_grad=False)  # unused
        for attr in self.row_buffers:
            fused.register_buffer(attr, cat(attr).reshape(getattr(first, attr).shape[:-1] + (-1,)), persistent=False)
        fused.register_buffer("_one", first._one.clone(), persistent=False)
        method.prepare_extras(fused)
        return fused

    def fused_method(self, spec: LayerSpec) -> "Nvfp4Method":
        """The method of a layer fusing this one's kind (``fuse``)."""
        return type(self)(self.config, spec)

    def input_global_scale(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
        """The activations' global scale, or None when they stay 16-bit."""
        if self.scheme == "w4a16":
            return None
        if self.scheme == "w4a4":
            return layer.input_scale
        return x.abs().amax().float() / (E2M1_MAX * FP8_E4M3_MAX)


def _shared_extras(layers: list[QuantLinear]) -> bool:
    """Whether the parts have the same extras: none, or one smoothing and one down projection."""
    first = layers[0]
    if any((layer.method.smoothed, layer.method.rank) != (first.method.smoothed, first.method.rank)
           for layer in layers):
        return False
    shared = ((SMOOTHING,) if first.method.smoothed else ()) + ((LORA_A,) if first.method.rank else ())
    return all(torch.equal(getattr(layer, attr), getattr(first, attr)) for layer in layers[1:] for attr in shared)


class Nvfp4ReferenceMethod(Nvfp4Method):
    """Dequantize the whole weight, fake-quantize the activations, matmul: the definition, on any
    device, slowly (a 16-bit copy of the weight per call)."""

    name = "nvfp4-reference"
    kind = "reference"

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize_nvfp4(layer.weight, layer.weight_scale, layer.weight_scale_2, k=layer.in_features,
                             dtype=x.dtype)
        global_scale = self.input_global_scale(layer, x)
        if global_scale is not None:
            x = fake_quantize_nvfp4(x, global_scale)
        return F.linear(x, w, bias)


class Nvfp4TritonW4A16Method(Nvfp4Method):
    """The packed weight stays packed: kernels/w4_gemm.py dequantizes each tile in registers and
    multiplies it with the 16-bit activations on the tensor cores. Activations are not quantized,
    so a W4A4 export runs more exactly than its definition (its input_scale goes unused). Not
    offered (``offer``): correct, but 2.6-3.4x the bf16 GEMM time at FLUX.1's large shapes on an
    H200 (docs/benchmarks/w4_gemm_operand_order_H200.json), where its decode is not hidden behind
    the tensor cores, against about 1.1x for the pass + cuBLAS; benchmarks/nvfp4_step.py measures it."""

    name = "nvfp4-triton-w4a16"
    kind = "weight-only"
    fold_extras = True

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from .kernels import w4_gemm

        rows = x.reshape(-1, x.shape[-1])
        args = (rows, layer.weight, layer.weight_scale, layer.weight_scale_2, bias)
        if torch.compiler.is_compiling() and w4_gemm.w4a16_gemm_op is not None:
            y = w4_gemm.w4a16_gemm_op(*args, w4_gemm.E2M1, w4_gemm.E4M3, BLOCK)
        else:
            y = w4_gemm.w4a16_gemm(*args)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def dequantize_rows(layer: QuantLinear, dtype: torch.dtype, row_factor: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight in ``dtype`` by one Triton pass, each row times ``row_factor`` [N] (the
    global scale folded in; ``layer._one`` stands for the whole-weight multiplier)."""
    from . import packed4

    return packed4.dequantize(layer.weight, layer.weight_scale, layer._one, layer.in_features, dtype,
                              codes=packed4.E2M1, scales=packed4.E4M3, group=BLOCK, row_factor=row_factor)


def weight_only_linear(layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None,
                       chunk_bytes: int | None = None) -> torch.Tensor:
    """x @ W^T + b with 16-bit activations (``packed4.linear``: a few rows by the packed GEMV,
    more by the pass and cuBLAS, in chunks of ``chunk_bytes`` where given), the global scale per
    row (``_row_global``)."""
    from . import packed4

    return packed4.linear(x, layer.weight, layer.weight_scale, layer._one, bias, layer.in_features,
                          codes=packed4.E2M1, scales=packed4.E4M3, group=BLOCK, row_factor=layer._row_global,
                          chunk_bytes=chunk_bytes)


def register_row_global(layer: QuantLinear) -> torch.Tensor:
    """weight_scale_2 held per output row (``_row_global``, so layers with different global scales
    fuse) and a 1 for the pass's whole-weight multiplier (``_one``); returns the per-row scale."""
    global_scale = layer.weight_scale_2.data.float().reshape(-1).expand(layer.out_features).contiguous()
    layer.register_buffer("_row_global", global_scale, persistent=False)
    layer.register_buffer("_one", torch.ones((), dtype=torch.float32, device=global_scale.device), persistent=False)
    return global_scale


class Nvfp4TritonDequantMethod(Nvfp4Method):
    """Packed weights stay packed between calls; at each call one Triton pass writes the layer's
    16-bit weight (bandwidth-bound, ``kernels.w4_gemm.w4_dequantize``), cuBLAS multiplies, and the
    copy is dropped: the transient memory is one layer's 16-bit weight. A few rows (modulation) skip
    the copy: the packed GEMV reads the 4-bit weight once. Activations stay 16-bit, as
    in ``nvfp4-triton-w4a16``. On an H200 this beats the fused kernel by 1.8-2.9x at FLUX.1's large
    shapes (``docs/benchmarks/nvfp4_step_H200.json``), so it is the one offered; the fused kernel is kept,
    measured, for the work that will make it faster.

    The pass multiplies each row by its global scale (``_row_global``): code * block scale is exact
    in fp32, and times 1 then the row's scale rounds as times the layer's scale does, so the weight
    is the format's to the bit; Q/K/V then fuse into one pass and one GEMM (``fuse``), which puts
    FLUX.1's blocks in diffgen-cuda's rewritten forward with its attention prologue kernel."""

    name = "nvfp4-triton-dequant"
    kind = "weight-only"
    fold_extras = True
    row_buffers = ("_row_global",)
    tp_derived = {"_row_global": 0}  # per output row: a split of a loaded layer slices it with the rows
    # None: each call writes the whole layer's 16-bit weight. A size: layers larger than it go in row
    # chunks of at most that size (``packed4.linear``); not the default until measured faster
    # (benchmarks/w4a16_chunks.py, nvfp4_step.py's ``diffgen_nvfp4_triton_dequant_chunked_fused``).
    chunk_bytes: int | None = None

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        super().process_weights_after_loading(layer)
        register_row_global(layer)

    def linear(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return weight_only_linear(layer, x, bias, self.chunk_bytes)


def w4a16_unavailable_reason(layer: LayerSpec, platform) -> str | None:
    from . import packed4

    return packed4.unavailable_reason(layer, platform, scales=packed4.E4M3)


def offer(config: QuantConfig, layer: LayerSpec, platform) -> list[LinearMethod] | None:
    if config.family != FAMILY:
        return None
    return [Nvfp4ReferenceMethod(config, layer),
            Nvfp4TritonDequantMethod(config, layer, unavailable_reason=w4a16_unavailable_reason(layer, platform))]
