"""The 4-bit dequantize pass (kernels/w4_gemm.py) on a GPU, and what it costs a weight-only GEMM.

Part "dequantize", at FLUX.1's weight shapes [N, K]: NVFP4 (E2M1 codes, E4M3 scales per 16, fp32
global) -> bf16, and -> FP8 E4M3 on a per-row grid (what nvfp4-triton-w4a8 writes), by
- "tiles": the interleaving pass it had (_w4_dequant_kernel, 64 x 256 tiles, 4 warps), and
- "pairs_RxB_wW": the byte-pair pass (_w4_dequant_pairs_kernel), tiles of R rows x B packed bytes
  ("single_cvt_pairs_shipped": the shipped tile rounding with Triton's casts, not PTX's paired cvt);
each written into a preallocated output (``*_GBps``: the kernel alone) and, for the shipped tiles,
through w4_dequantize, which allocates the output per call as the methods do (``alloc_*_GBps``).
GB/s counts the bytes the pass must move: packed codes and E4M3 scales read, plus the output
written (2 bytes per element for bf16, 1 for FP8; the per-row factors, N * 4 bytes, are left out).
``identical`` says the two passes wrote the same bits (they compute the same products in the same
order). Times from triton.testing.do_bench, which clears the L2 cache before each run.

Part "gemm", for the W4A16 question, at the GEMM shapes of benchmarks/nvfp4_step.py with M = 4608:
bf16 cuBLAS alone; each pass writing the bf16 weight then cuBLAS; and w4_linear_chunked, which
dequantizes CHUNK output rows at a time into one reused buffer and multiplies each chunk at once,
so the buffer stays in the 50 MB L2 (and packed4.linear_chunked, its size rule). For W4A8: FP8
torch._scaled_mm alone (a prequantized FP8 weight) and each pass writing the FP8 weight then
_scaled_mm (activation quantization not counted).

Prints one JSON line per row and the whole result (and writes it with --out). About a minute on an
H200. Needs CUDA SM89+ and Triton.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda")]

from diffgen.numerics.nvfp4 import quantize_nvfp4  # noqa: E402
from diffgen_cuda import packed4  # noqa: E402
from diffgen_cuda.kernels import w4_gemm  # noqa: E402

SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (3072, 15360), (21504, 3072)]
PAIR_TILES = [(8, 512, 4), (16, 512, 4), (32, 512, 8), (16, 1024, 8), (32, 1024, 8), (4, 1024, 4), (32, 256, 4),
              (64, 256, 8)]
GEMM_M = 4608
GEMM_SHAPES = [(3072, 3072), (3072, 12288), (15360, 3072)]  # (K, N) of the step's GEMMs at M = 4608
CHUNKS = [512, 1024, 2048, 4096]
FP8 = torch.float8_e4m3fn
DEVICE = "cuda"


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40)


def dequantize_rows(n: int, k: int) -> list[dict]:
    packed, scale, g = quantize_nvfp4(torch.randn(n, k, device=DEVICE))
    rows = packed4.row_scales(scale, g.reshape(1).expand(n).contiguous(), codes=packed4.E2M1, scales=packed4.E4M3)
    factor, one = rows[1], rows[2]
    out = []
    for dtype, label in ((torch.bfloat16, "bf16"), (FP8, "fp8")):
        # bf16: weight = code * scale * g; FP8: code * scale * 1 * (g / row), as nvfp4-triton-w4a8 calls it
        gs, row = (g, None) if dtype == torch.bfloat16 else (one, factor)
        moved = packed.numel() + scale.numel() + n * k * dtype.itemsize
        entry = {"part": "dequantize", "n": n, "k": k, "out": label, "bytes_moved": moved}
        y = torch.empty((n, k), dtype=dtype, device=DEVICE)

        def into(kernel, tile=None):
            return lambda: w4_gemm.w4_dequantize_into(y, packed, scale, gs, row, kernel=kernel, tile=tile)

        entry["tiles_64x256_w4_GBps"] = round(moved / bench_ms(into("tiles")) / 1e6, 1)
        old = y.clone()
        for tile in PAIR_TILES:
            key = "pairs_{}x{}_w{}".format(*tile)
            entry[f"{key}_GBps"] = round(moved / bench_ms(into("pairs", tile)) / 1e6, 1)
            entry.setdefault("identical", True)
            entry["identical"] &= torch.equal(y.view(torch.uint8), old.view(torch.uint8))
        paired, w4_gemm.CVT_X2 = w4_gemm.CVT_X2, False  # Triton's one-at-a-time casts, not PTX's paired cvt
        entry["single_cvt_pairs_shipped_GBps"] = round(moved / bench_ms(into("pairs")) / 1e6, 1)
        entry["identical"] &= torch.equal(y.view(torch.uint8), old.view(torch.uint8))
        w4_gemm.CVT_X2 = paired
        for kernel in ("tiles", "pairs"):
            ms = bench_ms(lambda: w4_gemm.w4_dequantize(packed, scale, gs, k, dtype, row, kernel=kernel))
            entry[f"alloc_{kernel}_shipped_GBps"] = round(moved / ms / 1e6, 1)
        best = max((v, key) for key, v in entry.items() if key.startswith("pairs_") and key.endswith("GBps"))
        entry["best_pairs"] = best[1][:-5]
        entry["best_pairs_vs_tiles"] = round(best[0] / entry["tiles_64x256_w4_GBps"], 2)
        out.append(entry)
        print(json.dumps(entry), flush=True)
    return out


def gemm_row(k: int, n: int) -> dict:
    m = GEMM_M
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
    packed, scale, g = quantize_nvfp4(w)
    entry = {"part": "gemm", "m": m, "k": k, "n": n}
    fns = {"bf16_gemm": lambda: x @ w.T,
           "tiles_dequant_then_gemm": lambda: x @ w4_gemm.w4_dequantize(packed, scale, g, k, torch.bfloat16,
                                                                        kernel="tiles").T,
           "pairs_dequant_then_gemm": lambda: x @ w4_gemm.w4_dequantize(packed, scale, g, k, torch.bfloat16).T,
           "pairs_dequant_alone": lambda: w4_gemm.w4_dequantize(packed, scale, g, k, torch.bfloat16)}
    for rows in CHUNKS:
        if rows < n:
            fns[f"chunked_{rows}_rows"] = (lambda rows=rows: w4_gemm.w4_linear_chunked(x, packed, scale, g, None, k,
                                                                                       chunk_rows=rows))
    rule = packed4.chunk_rows(k, n, torch.bfloat16)
    entry["chunk_rule_rows"] = rule
    fns["packed4_linear_chunked"] = lambda: packed4.linear_chunked(x, packed, scale, g, None, k, codes=packed4.E2M1,
                                                                   scales=packed4.E4M3, group=16)
    # W4A8: the FP8 weight on its per-row grid, then _scaled_mm with per-token FP8 activations
    scale_b, factor, one = packed4.row_scales(scale, g.reshape(1).expand(n).contiguous(), codes=packed4.E2M1,
                                              scales=packed4.E4M3)
    q = x.to(FP8)
    scale_a = torch.ones((m, 1), device=DEVICE)
    w8 = w.to(FP8)
    ones_b = torch.ones((1, n), device=DEVICE)
    fns["fp8_scaled_mm"] = lambda: torch._scaled_mm(q, w8.t(), scale_a=scale_a, scale_b=ones_b,
                                                    out_dtype=torch.bfloat16, use_fast_accum=True)
    fns["pairs_fp8_dequant_then_scaled_mm"] = lambda: torch._scaled_mm(
        q, w4_gemm.w4_dequantize(packed, scale, one, k, FP8, factor).t(), scale_a=scale_a, scale_b=scale_b,
        out_dtype=torch.bfloat16, use_fast_accum=True)
    fns["tiles_fp8_dequant_then_scaled_mm"] = lambda: torch._scaled_mm(
        q, w4_gemm.w4_dequantize(packed, scale, one, k, FP8, factor, kernel="tiles").t(), scale_a=scale_a,
        scale_b=scale_b, out_dtype=torch.bfloat16, use_fast_accum=True)
    for label, fn in fns.items():
        entry[f"{label}_ms"] = round(bench_ms(fn), 4)
    plain = (x.float() @ w4_gemm.w4_dequantize(packed, scale, g, k, torch.float32).T)
    for rows in CHUNKS:  # the chunks compute the same GEMM: close to the fp32 product
        if rows < n:
            got = w4_gemm.w4_linear_chunked(x, packed, scale, g, None, k, chunk_rows=rows).float()
            entry[f"chunked_{rows}_rows_rel_err"] = float((got - plain).abs().max() / plain.abs().max())
    base = entry["bf16_gemm_ms"]
    for label in fns:
        if label != "bf16_gemm" and label != "fp8_scaled_mm" and label != "pairs_dequant_alone":
            entry[f"{label}_vs_bf16"] = round(entry[f"{label}_ms"] / base, 3)
    print(json.dumps(entry), flush=True)
    return entry


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--part", choices=("all", "dequantize", "gemm"), default="all")
    args = parser.parse_args()
    started = time.time()
    result = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
              "triton": triton.__version__,
              "shipped": {"pairs": "{}x{}_w{}".format(*w4_gemm.PAIRS_TILE), "tiles": "{}x{}_w{}".format(
                  *w4_gemm.TILES_TILE)},
              "bytes_counted": "packed codes + E4M3 scales read + output written (per-row factors left out)",
              "rows": []}
    if args.part in ("all", "dequantize"):
        for n, k in SHAPES:
            result["rows"] += dequantize_rows(n, k)
    if args.part in ("all", "gemm"):
        for k, n in GEMM_SHAPES:
            result["rows"].append(gemm_row(k, n))
    result["wall_s"] = round(time.time() - started, 1)
    print(json.dumps({"wall_s": result["wall_s"]}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
