"""The 4-bit dequantize pass (kernels/w4_gemm.w4_dequantize) on a GPU: the interleaving pass
("tiles", shipped) against the pair pass ("pairs", PTX byte decode) at several tiles.

Part "dequantize", at FLUX.1's weight shapes [N, K]: NVFP4 (E2M1 codes, E4M3 scales per 16) into
bf16 (times the fp32 global, as nvfp4-triton-dequant writes it) and into FP8 E4M3 on a per-row grid
(what nvfp4-triton-w4a8 writes). GB/s counts the bytes a pass must move: packed codes and scales
read, the output written. ``identical``: every pair tile wrote the tiles pass's bits (both compute
the same products in the same order). ``alloc_*``: through w4_dequantize, which allocates the
output per call as the methods do.
Part "formats": MXFP4 (E8M0 scales per 32) and SVDQuant's int4 (bf16 scales per 64) at one shape.
Part "lowrank", at the same shapes into FP8: the shipped FP8 pass against the pass that also adds a
rank-32 branch (``w4_dequantize_lowrank``, nvfp4-triton-w4a8-lowrank's) at three tiles; GB/s counts
the same bytes plus the branch's factors, and ``lowrank_over_tiles`` is the time ratio.
Part "gemm", at the step's GEMM shapes with M = 4608 tokens: bf16 cuBLAS alone against each pass
writing the bf16 weight and then cuBLAS (what W4A16 costs per linear).

Times from triton.testing.do_bench (L2 cleared before each run). Prints one JSON line per row and
the whole result (and writes it with --out). About a minute on an H200. Needs CUDA SM89+ and Triton.
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
PAIR_TILES = [(64, 256, 4), (32, 256, 4), (64, 512, 4), (32, 512, 4), (128, 256, 8), (64, 256, 8), (16, 512, 4)]
GEMM_M = 4608
GEMM_SHAPES = [(3072, 3072), (3072, 12288), (15360, 3072)]  # (K, N)
FP8 = torch.float8_e4m3fn


def gbps(moved: int, fn) -> float:
    return round(moved / triton.testing.do_bench(fn, warmup=10, rep=40) / 1e6, 1)


def dequantize_rows(n: int, k: int) -> list[dict]:
    packed, scale, g = quantize_nvfp4(torch.randn(n, k, device="cuda"))
    _, factor, one = packed4.row_scales(scale, g.reshape(1).expand(n).contiguous(), codes=packed4.E2M1,
                                        scales=packed4.E4M3)
    rows = []
    for dtype, label, gs, row in ((torch.bfloat16, "bf16", g, None), (FP8, "fp8", one, factor)):
        moved = packed.numel() + scale.numel() + n * k * dtype.itemsize
        entry = {"part": "dequantize", "n": n, "k": k, "out": label, "bytes_moved": moved}

        def run(kind, tile=None):
            return w4_gemm.w4_dequantize(packed, scale, gs, k, dtype, row, kind=kind, tile=tile)

        shipped = run("tiles")
        entry["tiles_64x256_w4_GBps"] = gbps(moved, lambda: run("tiles"))
        entry["identical"] = True
        for tile in PAIR_TILES:
            entry["pairs_{}x{}_w{}_GBps".format(*tile)] = gbps(moved, lambda tile=tile: run("pairs", tile))
            entry["identical"] &= torch.equal(run("pairs", tile).view(torch.uint8), shipped.view(torch.uint8))
        best = max((v, key) for key, v in entry.items() if key.startswith("pairs_"))
        entry["best_pairs"] = best[1][:-5]
        entry["best_pairs_vs_tiles"] = round(best[0] / entry["tiles_64x256_w4_GBps"], 3)
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    return rows


LOWRANK_TILES = ((64, 256, 4), (64, 128, 4), (128, 128, 8))


def lowrank_row(n: int, k: int, rank: int = 32) -> dict:
    packed, scale, g = quantize_nvfp4(torch.randn(n, k, device="cuda"))
    _, factor, one = packed4.row_scales(scale, g.reshape(1).expand(n).contiguous(), codes=packed4.E2M1,
                                        scales=packed4.E4M3)
    b = torch.randn(n, rank, device="cuda", dtype=torch.bfloat16) * 0.01
    a = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16)
    moved = packed.numel() + scale.numel() + n * k
    entry = {"part": "lowrank", "n": n, "k": k, "rank": rank, "bytes_moved": moved + 2 * rank * (n + k)}
    tiles_ms = triton.testing.do_bench(lambda: w4_gemm.w4_dequantize(packed, scale, one, k, FP8, factor),
                                       warmup=10, rep=40)
    entry["tiles_fp8_GBps"] = round(moved / tiles_ms / 1e6, 1)
    want = (w4_gemm.w4_dequantize(packed, scale, one, k, torch.float32, factor) + b.float() @ a.float())
    want = want.clamp(-448, 448).to(FP8).float()
    for tile in LOWRANK_TILES:
        label = "lowrank_{}x{}_w{}".format(*tile)

        def run(tile=tile):
            return w4_gemm.w4_dequantize_lowrank(packed, scale, k, factor, b, a, tile=tile)

        ms = triton.testing.do_bench(run, warmup=10, rep=40)
        entry[f"{label}_GBps"] = round(entry["bytes_moved"] / ms / 1e6, 1)
        entry[f"{label}_over_tiles"] = round(ms / tiles_ms, 3)
        got = run().float()  # within one E4M3 step of the same sum in PyTorch
        entry[f"{label}_within_a_step"] = bool(((got - want).abs() <= want.abs() * 2 ** -3 + 2 ** -6).all())
    print(json.dumps(entry), flush=True)
    return entry


def format_row(codes: int, scales: int, group: int, label: str, n: int = 3072, k: int = 12288) -> dict:
    """The other formats the pass serves (random codes and scales: the pass's cost does not depend
    on the values), into bf16 with the default pair tile against the shipped pass."""
    packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
    if scales == packed4.E8M0:
        scale = torch.randint(118, 131, (n, k // group), device="cuda", dtype=torch.uint8)
    else:
        scale = (torch.rand(n, k // group, device="cuda") + 0.05).to(torch.bfloat16)
    one = torch.ones((), device="cuda")
    moved = packed.numel() + scale.numel() * scale.element_size() + n * k * 2
    entry = {"part": "formats", "format": label, "n": n, "k": k, "out": "bf16", "bytes_moved": moved}

    def run(kind):
        return w4_gemm.w4_dequantize(packed, scale, one, k, torch.bfloat16, codes=codes, scales=scales, group=group,
                                     kind=kind)

    for kind in ("tiles", "pairs"):
        entry[f"{kind}_GBps"] = gbps(moved, lambda kind=kind: run(kind))
    entry["identical"] = torch.equal(run("pairs").view(torch.uint8), run("tiles").view(torch.uint8))
    entry["pairs_vs_tiles"] = round(entry["pairs_GBps"] / entry["tiles_GBps"], 3)
    print(json.dumps(entry), flush=True)
    return entry


def gemm_row(k: int, n: int) -> dict:
    x = torch.randn(GEMM_M, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, scale, g = quantize_nvfp4(w)
    entry = {"part": "gemm", "m": GEMM_M, "k": k, "n": n}
    fns = {"bf16_gemm": lambda: x @ w.T}
    for kind in ("tiles", "pairs"):
        fns[f"{kind}_then_gemm"] = lambda kind=kind: x @ w4_gemm.w4_dequantize(packed, scale, g, k, torch.bfloat16,
                                                                               kind=kind).T
    for label, fn in fns.items():
        entry[f"{label}_ms"] = round(triton.testing.do_bench(fn, warmup=10, rep=40), 4)
    for kind in ("tiles", "pairs"):
        entry[f"{kind}_then_gemm_over_bf16"] = round(entry[f"{kind}_then_gemm_ms"] / entry["bf16_gemm_ms"], 3)
    print(json.dumps(entry), flush=True)
    return entry


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--parts", nargs="+", default=["dequantize", "formats", "lowrank", "gemm"],
                        choices=["dequantize", "formats", "lowrank", "gemm"])
    args = parser.parse_args()
    started = time.time()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shipped": w4_gemm.DEQUANT_PASS, "pairs_default_tile": "{}x{}_w{}".format(*w4_gemm.PAIRS_TILE),
              "bytes_counted": "packed codes + E4M3 scales read + output written (per-row factors left out)",
              "rows": []}
    if "dequantize" in args.parts:
        for n, k in SHAPES:
            result["rows"] += dequantize_rows(n, k)
    if "formats" in args.parts:
        result["rows"].append(format_row(packed4.E2M1, packed4.E8M0, 32, "mxfp4 (E8M0 per 32)"))
        result["rows"].append(format_row(packed4.INT4, packed4.FLOAT, 64, "int4 (bf16 per 64, SVDQuant's)"))
    if "lowrank" in args.parts:
        result["rows"] += [lowrank_row(n, k) for n, k in SHAPES]
    if "gemm" in args.parts:
        for k, n in GEMM_SHAPES:
            result["rows"].append(gemm_row(k, n))
    result["wall_s"] = round(time.time() - started, 1)
    print(json.dumps({"wall_s": result["wall_s"]}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
