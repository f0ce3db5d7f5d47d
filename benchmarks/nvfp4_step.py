"""One FLUX.1-dev-sized denoising step with NVFP4 weights on a GPU without FP4 tensor cores, every
variant side by side in one process; prints JSON (and writes it with --out).

Variants (the same random bf16 model; NVFP4 weights quantized from it by the format's definition):
- bf16: diffusers' model as it is;
- diffgen NVFP4 W4A8 (``nvfp4-triton-w4a8``, native, first choice on SM89+): weights packed on the
  GPU; at each call one Triton pass writes the layer's weight as FP8 on a per-row grid, the
  activations are quantized per token, ``torch._scaled_mm`` multiplies; and the same in diffgen-cuda's
  rewritten FLUX.1 blocks (``_fused``: Q/K/V fused, FP8 inputs from the LayerNorm + modulation and
  GELU producers, as load_transformer applies them);
- diffgen NVFP4 dequant (``nvfp4-triton-dequant``, weight-only): weights packed
  on the GPU; at each call one Triton pass writes the layer's bf16 weight, cuBLAS multiplies; and
  the same in the rewritten FLUX.1 blocks (``_fused``: Q/K/V fused into one pass and one GEMM, the
  attention prologue kernel; the inputs stay bf16), as load_transformer applies them; and
  ``_chunked_fused``, the same with layers over 16 MB of bf16 done in row chunks (each chunk's weight
  written by the pass and read at once by its GEMM: ``packed4.linear``'s ``chunk_bytes``); and
  ``_pairs_fused`` (W4A16 and W4A8), with the pair pass writing each weight (``w4_gemm.DEQUANT_PASS``);
- with --with-fused-kernel, diffgen NVFP4 W4A16 fused kernel (``nvfp4-triton-w4a16``, not offered): the weight tile
  dequantized in registers inside a Triton GEMM (kernels/w4_gemm.py), never written;
- ``_svd32`` (W4A8 and weight-only): the layers as ModelOpt's NVFP4_SVD exports hold them (rank 32,
  the diffusers example's default; smoothing and low-rank branch around the 4-bit GEMM), in
  diffusers' blocks, each layer with its own branch (ModelOpt's export shares one down projection
  across Q/K/V, which lets the rewritten blocks fuse them; not modelled here); and
  the shipped methods fold the extras (``extras.py``: smoothing inside the FP8 quantizer, lora_a * s,
  the branch added by addmm_); ``w4a8_svd32_unfolded`` computes them as written (x * s, the branch's
  product, an add), as diffgen did before, beside them; ``w4a8_svd32_compiled_fold``, an experiment,
  keeps lora_a * s under torch.compile too (the shipped methods write the extras out there); and
  ``w4a8_svd32_lowrank`` (``nvfp4-triton-w4a8-lowrank``, the default for layers with a branch): the
  branch folded into the FP8 weight the per-call pass writes, no branch GEMMs;
- naive NVFP4 (the peers' fallback, e.g. diffusers' bfl path below SM100): dequantize the whole
  weight in PyTorch at every call, then a bf16 GEMM (diffgen's nvfp4-reference method, W4A16);
- diffgen FP8 dynamic with diffgen-cuda's fused FLUX.1 blocks (benchmarks/fp8_step.py's variant),
  for the FP8 alternative at 0.5x the bytes;
- diffgen MXFP4 packed4 (``mxfp4-packed4`` of diffgen-rocm, weight-only: what ``--quantization
  mxfp4`` and Quark MXFP4 checkpoints run on Hopper): the same random weights quantized to MXFP4
  (E8M0 scale per 32, the "even" rule), one Triton pass per call writes the bf16 weight through
  diffgen-cuda's packed4, cuBLAS multiplies (``--mxfp4-only``: bf16 and this row alone); and
  ``mxfp4-packed4-w4a8``, the same weights on FP8 tensor cores (packed4.linear_fp8);
Eager and compiled (regional: every transformer block). Also the GEMM shapes of the step alone.
With --profile, each row's eager step per kernel class and its top kernels
(``family_profile.profile``): where a variant's time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8_step as base  # noqa: E402  (puts core/ and plugins/diffgen-cuda on the path)

from diffgen.linear import QuantLinear  # noqa: E402
from diffgen.numerics.nvfp4 import quantize_nvfp4  # noqa: E402
from diffgen.quant import LayerSpec, QuantConfig  # noqa: E402
from diffgen_cuda.extras import FOLDED_A  # noqa: E402
from diffgen_cuda.fused import Fp8TritonMethod  # noqa: E402
from diffgen_cuda.nvfp4 import Nvfp4ReferenceMethod, Nvfp4TritonDequantMethod, Nvfp4TritonW4A16Method  # noqa: E402
from diffgen_cuda.nvfp4_w4a8 import Nvfp4TritonW4A8LowrankMethod, Nvfp4TritonW4A8Method  # noqa: E402
from host_timing import event_ms, graph_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "diffgen-rocm"))
from diffgen_rocm.mxfp4 import quantize_mxfp4  # noqa: E402
from diffgen_rocm.mxfp4_cuda import Mxfp4Packed4Method, Mxfp4Packed4W4A8Method  # noqa: E402


class ChunkedDequantMethod(Nvfp4TritonDequantMethod):
    """nvfp4-triton-dequant with layers over 16 MB of bf16 dequantized and multiplied in row chunks
    (``packed4.linear``'s ``chunk_bytes``): does each chunk's weight, still in L2, make the pass cheaper?"""

    chunk_bytes = 16 << 20


class UnfoldedExtrasW4A8Method(Nvfp4TritonW4A8Method):
    """nvfp4-triton-w4a8 with the extras computed as written (``extras.Extras.apply``'s exact path)."""

    fold_extras = False


class CompiledFoldW4A8Method(Nvfp4TritonW4A8Method):
    """An experiment: nvfp4-triton-w4a8 whose extras stay folded under torch.compile too, the branch
    added out of place. The shipped method writes them out there (Inductor then writes x * s once
    for the branch's down projection, as the extern GEMM's input); with lora_a * s the down
    projection reads x, and the multiply lives only inside the quantizer Inductor fuses."""

    def apply(self, layer: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not (self.has_extras and torch.compiler.is_compiling()):
            return super().apply(layer, x, bias)
        if self.smoothed:
            y = self.linear_smoothed(layer, x, layer.pre_quant_scale, bias)
        else:
            y = self.linear(layer, x, bias)
        if self.rank:
            a = getattr(layer, FOLDED_A) if self.smoothed else layer.svdquant_lora_a
            y = y + F.linear(F.linear(x, a), layer.svdquant_lora_b)
        return y


def make_nvfp4(linears, method_cls, lowrank: int = 0) -> dict[str, QuantLinear]:
    """NVFP4 layers of the same weights; with ``lowrank``, as NVFP4_SVD exports hold them: the weight's
    top singular directions in the branch (svdquant_lora_a/b), the rest in NVFP4, and a smoothing of
    ones (pre_quant_scale; its cost is the multiply, whatever the values)."""
    params = {"smoothed": tuple(linears), "lowrank": tuple((n, lowrank) for n in linears)} if lowrank else {}
    config = QuantConfig.make("nvfp4", scheme="w4a16", params=params)
    out = {}
    for name, lin in linears.items():
        spec = LayerSpec(name, lin.in_features, lin.out_features, lin.bias is not None, torch.bfloat16)
        with torch.device("cuda"):
            layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.bfloat16)
        weight = lin.weight.data
        if lowrank:
            # randomized: seeded per layer, so that every variant and its reference hold the same branch
            torch.manual_seed(zlib.crc32(name.encode()))
            u, s, v = torch.svd_lowrank(weight.float(), q=lowrank, niter=2)
            layer.svdquant_lora_b.data, layer.svdquant_lora_a.data = (u * s).bfloat16(), v.t().bfloat16()
            layer.pre_quant_scale.data.fill_(1.0)
            weight = (weight.float() - layer.svdquant_lora_b.float() @ layer.svdquant_lora_a.float()).bfloat16()
        packed, scale, global_scale = quantize_nvfp4(weight)
        layer.weight.data, layer.weight_scale.data, layer.weight_scale_2.data = packed, scale, global_scale
        if lin.bias is not None:
            layer.bias.data = lin.bias.data
        layer.method.process_weights_after_loading(layer)
        out[name] = layer
    return out


def make_mxfp4(linears, method_cls=Mxfp4Packed4Method) -> dict[str, QuantLinear]:
    """MXFP4 layers (diffgen-rocm's mxfp4 family, a checkpoint's layout) from the bf16 linears."""
    config = QuantConfig.make("mxfp4", scheme="w4a4", params={"scale_rounding": "even"})
    out = {}
    for name, lin in linears.items():
        spec = LayerSpec(name, lin.in_features, lin.out_features, lin.bias is not None, torch.bfloat16)
        with torch.device("cuda"):
            layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.bfloat16)
        layer.weight.data, layer.weight_scale.data = quantize_mxfp4(lin.weight.data, "even")
        if lin.bias is not None:
            layer.bias.data = lin.bias.data
        layer.method.process_weights_after_loading(layer)
        out[name] = layer
    return out


def gemm_table(shapes, reps=20) -> list[dict]:
    """Each distinct GEMM of the step: bf16 cuBLAS, the W4A16 kernel, naive dequantize + cuBLAS."""
    from diffgen.numerics.nvfp4 import dequantize_nvfp4
    from diffgen_cuda.kernels.w4_gemm import GEMV_ROWS, w4_dequantize, w4_gemv, w4a16_gemm

    rows = []
    for (m, k, n), count in sorted(shapes.items()):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, scale, g = quantize_nvfp4(w)
        fns = {"bf16": lambda: x @ w.T,
               "w4a16_triton": lambda: w4a16_gemm(x, packed, scale, g, None),
               "naive_dequant_then_bf16": lambda: x @ dequantize_nvfp4(packed, scale, g, k=k, dtype=torch.bfloat16).T,
               # diffgen's nvfp4-triton-dequant: a transient 16-bit copy written by one Triton pass
               "triton_dequant_then_bf16": lambda: x @ w4_dequantize(packed, scale, g, k, torch.bfloat16).T}
        if m <= GEMV_ROWS:  # what the weight-only methods run for a few rows: the packed GEMV
            fns["w4_gemv"] = lambda: w4_gemv(x, packed, scale, g, None, None)
        row = {"m": m, "k": k, "n": n, "count_per_step": count}
        expected = x @ dequantize_nvfp4(packed, scale, g, k=k, dtype=torch.bfloat16).T
        for label, fn in fns.items():
            try:
                for _ in range(3):
                    got = fn()
                row[f"{label}_ms"] = statistics.median(event_ms(fn) for _ in range(reps))
            except Exception as exc:  # a kernel that fails to build is a row entry, not the end of the run
                row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            row[f"{label}_max_rel_err"] = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
            row[f"{label}_vs_bf16"] = row[f"{label}_ms"] / row["bf16_ms"]
            if m <= GEMV_ROWS:  # these kernels take microseconds: the event times above are launch cost
                try:
                    row[f"{label}_graph_ms"] = graph_ms(fn)  # GPU time, from CUDA-graph replays
                except RuntimeError as exc:  # the naive path builds a CPU table per call: not capturable
                    row[f"{label}_graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--gemm-only", action="store_true", help="only the GEMM shapes of the step")
    parser.add_argument("--with-fused-kernel", action="store_true",
                        help="also the fused W4A16 GEMM kernel (slow: 3-3.6x bf16 on an H200)")
    parser.add_argument("--mxfp4-only", action="store_true",
                        help="only bf16 and the MXFP4 rows (diffgen-rocm's mxfp4-packed4 and -w4a8), no GEMM table")
    parser.add_argument("--variants", nargs="+", metavar="LABEL",
                        help="only these rows (bf16 always runs: the ratios are against it), e.g. "
                             "diffgen_nvfp4_triton_dequant_fused diffgen_nvfp4_w4a8_fused")
    parser.add_argument("--profile", action="store_true", help="each row's eager step per kernel class too")
    args = parser.parse_args()

    def wanted(label: str) -> bool:
        return args.variants is None or label in args.variants

    started = time.time()
    model = base.build_model(args.tiny)
    x = base.inputs(model, args.tiny)
    linears = base.quantized_linears(model)
    amax, shapes = base.calibrate(model, linears, x)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "workload": "FLUX.1-dev-sized FluxTransformer2DModel, random bf16 weights, 1024x1024 (4096 image + "
                          "512 text tokens), batch 1, one forward" if not args.tiny else "tiny smoke test",
              "quantized_linears": len(linears),
              "variants": {}}
    with torch.no_grad():
        reference = model(**x)[0]
    result["weight_bytes_bf16"] = base.weight_bytes(model)
    originals = dict(linears)

    # the nvfp4-reference method's output (the format's definition) for the layers as make_nvfp4 builds
    # them, by its lowrank: the _svd32 layers hold other NVFP4 weights (the weight less the branch)
    nvfp4_references = {}

    def measure(label):
        entry = {}
        entry["eager_ms"], _ = base.time_step(model, x, iters=args.iters)
        with torch.no_grad():
            out = model(**x)[0]
            entry["cosine_vs_bf16"] = base.cosine(out, reference)
            nvfp4_reference = nvfp4_references.get(32 if "_svd32" in label else 0)
            if "nvfp4" in label and nvfp4_reference is not None:
                entry["cosine_vs_nvfp4_reference"] = base.cosine(out, nvfp4_reference)
        entry["weight_bytes"] = base.weight_bytes(model)
        if args.profile:
            from family_profile import profile

            entry["profile"] = profile(model, x, steps=2)
        if not args.no_compile:
            base.set_compiled(model, True)
            entry["compiled_ms"], _ = base.time_step(model, x, warmup=3, iters=args.iters)
            base.set_compiled(model, False)
        for key in ("eager_ms", "compiled_ms"):
            if key in entry:
                entry[key.replace("_ms", "_median_ms")] = statistics.median(entry[key])
        result["variants"][label] = entry
        print(json.dumps({label: {k: v for k, v in entry.items() if "median" in k or "cosine" in k}}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    if args.gemm_only:
        result["gemm_shapes"] = gemm_table(shapes)
        for r in result["gemm_shapes"]:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    measure("bf16")
    if args.mxfp4_only:
        bf16 = result["variants"]["bf16"]
        result["ratios"] = {}
        for label, cls in (("diffgen_mxfp4_packed4", Mxfp4Packed4Method),
                           ("diffgen_mxfp4_packed4_w4a8", Mxfp4Packed4W4A8Method)):
            base.swap(model, make_mxfp4(originals, cls))
            measure(label)
            base.swap(model, originals)
            torch.cuda.empty_cache()
            mx = result["variants"][label]
            result["ratios"].update({f"{label}_{k}_time_vs_bf16": mx[f"{k}_median_ms"] / bf16[f"{k}_median_ms"]
                                     for k in ("eager", "compiled") if f"{k}_median_ms" in mx})
            result["ratios"][f"{label}_weight_bytes_vs_bf16"] = mx["weight_bytes"] / result["weight_bytes_bf16"]
        result["wall_s"] = time.time() - started
        print(json.dumps(result["ratios"], indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    for lowrank in (0, 32) if args.variants is None or any("_svd32" in v for v in args.variants) else (0,):
        base.swap(model, make_nvfp4(originals, Nvfp4ReferenceMethod, lowrank=lowrank))
        with torch.no_grad():
            nvfp4_references[lowrank] = model(**x)[0]
        base.swap(model, originals)
        torch.cuda.empty_cache()
    variants = [("diffgen_nvfp4_w4a8", Nvfp4TritonW4A8Method), ("diffgen_nvfp4_triton_dequant", Nvfp4TritonDequantMethod),
                ("naive_nvfp4_dequantize_then_bf16", Nvfp4ReferenceMethod)]
    if args.with_fused_kernel:
        variants.append(("diffgen_nvfp4_w4a16_fused_kernel", Nvfp4TritonW4A16Method))
    variants += [("diffgen_nvfp4_w4a8_svd32", Nvfp4TritonW4A8Method), ("diffgen_nvfp4_triton_dequant_svd32",
                                                                        Nvfp4TritonDequantMethod),
                 ("diffgen_nvfp4_w4a8_svd32_unfolded", UnfoldedExtrasW4A8Method),
                 ("diffgen_nvfp4_w4a8_svd32_compiled_fold", CompiledFoldW4A8Method),
                 ("diffgen_nvfp4_w4a8_svd32_lowrank", Nvfp4TritonW4A8LowrankMethod)]
    for label, cls in variants:
        if not wanted(label):
            continue
        base.swap(model, make_nvfp4(originals, cls, lowrank=32 if "_svd32" in label else 0))
        measure(label)
        base.swap(model, originals)
        torch.cuda.empty_cache()
    # Both in diffgen-cuda's rewritten FLUX.1 blocks: Q/K/V fused, the attention prologue kernel, and
    # for W4A8 FP8 inputs from the producers
    # (``_pairs``: with the pair pass writing each weight, w4_gemm.DEQUANT_PASS "pairs")
    from diffgen_cuda.kernels import w4_gemm

    shipped_pass = w4_gemm.DEQUANT_PASS
    for label, cls, kind in (("w4a8", Nvfp4TritonW4A8Method, shipped_pass),
                             ("triton_dequant", Nvfp4TritonDequantMethod, shipped_pass),
                             ("triton_dequant_chunked", ChunkedDequantMethod, shipped_pass),
                             ("w4a8_pairs", Nvfp4TritonW4A8Method, "pairs"),
                             ("triton_dequant_pairs", Nvfp4TritonDequantMethod, "pairs")):
        if not wanted(f"diffgen_nvfp4_{label}_fused"):
            continue
        base.swap(model, make_nvfp4(originals, cls))
        result[f"rewritten_{label}"] = base.rewrite(model)
        w4_gemm.DEQUANT_PASS = kind
        try:
            measure(f"diffgen_nvfp4_{label}_fused")
        finally:
            w4_gemm.DEQUANT_PASS = shipped_pass
        base.unrewrite(model)
        base.swap(model, originals)
        torch.cuda.empty_cache()
    for label, cls in (("diffgen_mxfp4_packed4", Mxfp4Packed4Method),
                       ("diffgen_mxfp4_packed4_w4a8", Mxfp4Packed4W4A8Method)):
        if wanted(label):
            base.swap(model, make_mxfp4(originals, cls))
            measure(label)
            base.swap(model, originals)
            torch.cuda.empty_cache()
    if wanted("diffgen_fp8_dynamic_fused"):
        base.swap(model, base.make_fp8(originals, Fp8TritonMethod, False, amax))
        base.rewrite(model)
        measure("diffgen_fp8_dynamic_fused")
        base.unrewrite(model)
        base.swap(model, originals)
    result["gemm_shapes"] = gemm_table(shapes)
    bf16 = result["variants"]["bf16"]
    ratios = {}
    for label, v in result["variants"].items():
        ratios[f"{label}_eager_time_vs_bf16"] = v["eager_median_ms"] / bf16["eager_median_ms"]
        if "compiled_median_ms" in v:
            ratios[f"{label}_compiled_time_vs_bf16_compiled"] = v["compiled_median_ms"] / bf16["compiled_median_ms"]
        ratios[f"{label}_weight_bytes_vs_bf16"] = v["weight_bytes"] / result["weight_bytes_bf16"]
    result["ratios"] = ratios
    result["notes"] = ["ratios are time / bf16 time: below 1 is faster than bf16",
                       "weight bytes are the whole model's (quantized linears, the 16-bit embedders and norms)"]
    result["wall_s"] = time.time() - started
    print(json.dumps(ratios, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
