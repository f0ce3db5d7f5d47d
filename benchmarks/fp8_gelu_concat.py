"""GELU + concat + FP8 quantization at FLUX.1's shapes: diffgen-cuda's producer kernel against the
same ops compiled by Inductor and run eagerly in PyTorch (what diffusers' forward + a quantizer does).

Shapes: the single block's proj_out input (4608 tokens, attention 3072 + GELU(proj_mlp) 12288) and
the double block's ff.net.2 input (4096 image / 512 text tokens, GELU 12288), with a static scale
and with per-token scales. CUDA-graph replay, median of 5 replays of 20 calls (host_timing.graph_us). Also how many FP8
codes the kernel and Inductor's version differ in. Prints JSON; --out writes it. Needs CUDA SM89+.

    python benchmarks/fp8_gelu_concat.py --out docs/benchmarks/fp8_gelu_concat_H100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda")]

from diffgen.linear import gelu_concat  # noqa: E402
from diffgen.numerics.fp8 import quantize_fp8_per_token, quantize_fp8_static  # noqa: E402
from diffgen_cuda.kernels.fp8_producers import gelu_concat_quant  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_timing import graph_us  # noqa: E402

FP8 = torch.float8_e4m3fn


def pytorch_ops(a, h, scale):
    y = gelu_concat(a, h).reshape(-1, h.shape[-1] + (0 if a is None else a.shape[-1]))
    return (quantize_fp8_static(y, scale, FP8), scale) if scale is not None else quantize_fp8_per_token(y, FP8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    inductor = torch.compile(pytorch_ops)
    with torch.no_grad():
        for m, ka, kh in [(4608, 3072, 12288), (4096, 0, 12288), (512, 0, 12288)]:
            g = torch.Generator("cuda").manual_seed(0)
            h = (torch.randn(m, kh, device="cuda", generator=g) * 2).bfloat16()
            a = torch.randn(m, ka, device="cuda", generator=g).bfloat16() if ka else None
            for static in (True, False):
                scale = torch.tensor(6.0 / 448, device="cuda") if static else None
                row = {"M": m, "Ka": ka, "Kh": kh, "scales": "static" if static else "per-token",
                       "kernel_us": graph_us(lambda: gelu_concat_quant(a, h, scale, FP8)),
                       "inductor_us": graph_us(lambda: inductor(a, h, scale)),
                       "pytorch_eager_us": graph_us(lambda: pytorch_ops(a, h, scale)),
                       # bytes read (bf16) and written (FP8) at 3.35 TB/s, the H100 SXM's peak
                       "memory_bound_us": m * (ka + kh) * 3 / 3.35e6}
                q, _ = gelu_concat_quant(a, h, scale, FP8)
                q_ref, _ = inductor(a, h, scale)
                row["codes_differing_from_inductor"] = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
