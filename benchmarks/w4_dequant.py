"""The NVFP4 -> FP8 / bf16 dequantize pass (kernels/w4_gemm.w4_dequantize) at FLUX.1's weight shapes:
effective bandwidth (packed bytes + scales read, output written) per tile configuration, against
the shipped one. Prints JSON (and writes it with --out). Needs CUDA SM89+ and Triton."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda")]

from diffgen.numerics.nvfp4 import quantize_nvfp4  # noqa: E402
from diffgen_cuda.kernels import w4_gemm  # noqa: E402

SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (3072, 15360), (21504, 3072)]
CONFIGS = [(32, 256, 4), (64, 256, 4), (64, 256, 8), (128, 128, 8), (16, 512, 4), (32, 512, 8)]


def run(weight, scale, g, k, dtype, row, block_n, block_k, warps):
    n, kp = weight.shape[0], 2 * weight.shape[1]
    y = torch.empty((n, k), dtype=dtype, device=weight.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp, block_k))
    w4_gemm._w4_dequant_kernel[grid](weight, scale.view(torch.uint8), g, row, y, n, k, kp, weight.stride(0),
                                     scale.stride(0), y.stride(0), CODES=0, SCALES=0, GROUP=16, PER_ROW=True,
                                     BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for n, k in SHAPES:
        packed, scale, g = quantize_nvfp4(torch.randn(n, k, device="cuda"))
        row = torch.ones(n, device="cuda")
        moved = packed.numel() + scale.numel() + n * k  # bytes: packed + E4M3 scales read, FP8 written
        entry = {"n": n, "k": k}
        for bn, bk, w in CONFIGS:
            ms = triton.testing.do_bench(lambda: run(packed, scale, g, k, torch.float8_e4m3fn, row, bn, bk, w))
            entry[f"{bn}x{bk}_w{w}_GBps"] = round(moved / ms / 1e6, 1)
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "shipped": "64x256_w4", "shapes": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
