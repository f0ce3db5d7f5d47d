"""The few-row FP8-weight GEMV (diffgen_cuda/kernels/fp8_gemv.py) on a GPU: agreement with
x @ (W * s_w)^T + b in fp32, its time per FLUX modulation shape and row count for a sweep of
block configurations against bf16 F.linear and the quantize + torch._scaled_mm path it replaced
(CUDA-graph replay, so GPU time only), and its host cost per eager call.

    python benchmarks/fp8_gemv.py --out docs/benchmarks/fp8_gemv_H100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "core"), os.path.join(ROOT, "plugins", "diffgen-cuda")]

from diffgen.numerics.fp8 import per_channel_scale, quantize_fp8  # noqa: E402
from diffgen_cuda.kernels.fp8_gemv import FEW_ROWS, ONE_ROW, fp8_gemv  # noqa: E402
from diffgen_cuda.kernels.fp8_quant import quant_fp8_per_token  # noqa: E402
from host_timing import graph_ms, host_us  # noqa: E402

FP8 = torch.float8_e4m3fn
CONFIGS = [(16, 512, 4, 3), (8, 1024, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4),
           (32, 512, 4, 3), (64, 256, 4, 3), (16, 256, 4, 4), (64, 128, 4, 4)]
# FLUX.1's modulation linears (double: norm1 / norm1_context, single: norm), Qwen-Image's img_mod
# and Wan-sized ones.
SHAPES = [(3072, 18432), (3072, 9216), (3072, 6144), (5120, 30720)]


def key(cfg) -> str:
    return "gemv_" + "_".join(map(str, cfg)) + "_us"


def layer(k, n, dev="cuda"):
    wf = torch.randn(n, k, device=dev) * 0.02
    ws = per_channel_scale(wf)
    return quantize_fp8(wf, ws[:, None]), ws, torch.randn(n, device=dev, dtype=torch.bfloat16)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args()
    import triton

    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "default_configs": {"one_row": ONE_ROW, "few_rows": FEW_ROWS},
           "config_fields": "BLOCK_N, BLOCK_K, num_warps, num_stages"}

    worst = 0.0
    for m, k, n in [(1, 3072, 18432), (4, 3072, 9216), (2, 3000, 1000), (3, 200, 40)]:
        w, ws, b = layer(k, n)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
        expected = (x.float() @ w.float().t()) * ws + b.float()
        for cfg in CONFIGS:
            d = (fp8_gemv(x, w, ws, b, config=cfg).float() - expected).abs().max().item()
            worst = max(worst, d / expected.abs().max().item())
    out["max_error_relative_to_max_output"] = worst
    print(json.dumps(out), flush=True)

    rows = []
    for k, n in SHAPES:
        w, ws, b = layer(k, n)
        wf = (w.float() * ws[:, None]).bfloat16()
        for m in (1, 2, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            sb = ws.reshape(1, -1).contiguous()

            def quantized():
                q, sa = quant_fp8_per_token(x, FP8)
                return torch._scaled_mm(q, w.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

            row = {"m": m, "k": k, "n": n, "bf16_linear_us": graph_ms(lambda: F.linear(x, wf, b)) * 1e3,
                   "quant_and_scaled_mm_us": graph_ms(quantized) * 1e3}
            for cfg in CONFIGS:
                row[key(cfg)] = graph_ms(lambda: fp8_gemv(x, w, ws, b, config=cfg)) * 1e3
            gemv = {kk: v for kk, v in row.items() if kk.startswith("gemv_")}
            row["gemv_default_us"] = row[key(ONE_ROW if m == 1 else FEW_ROWS)]
            row["gemv_best"] = min(gemv, key=gemv.get)
            row["weight_TBps_default"] = n * k / row["gemv_default_us"] / 1e6
            rows.append(row)
            print(json.dumps({kk: v for kk, v in row.items() if not kk.startswith("gemv_") or kk in
                              ("gemv_default_us", "gemv_best")}), flush=True)
    out["speed"] = rows

    w, ws, b = layer(256, 256)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    lin = torch.nn.Linear(256, 256, device="cuda", dtype=torch.bfloat16)
    out["host_us_per_call"] = {"gemv": host_us(lambda: fp8_gemv(x, w, ws, b), n=3000, warmup=50),
                               "F.linear": host_us(lambda: lin(x), n=3000, warmup=50)}
    print(json.dumps(out["host_us_per_call"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
