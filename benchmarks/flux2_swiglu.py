"""SwiGLU (+ concat) + FP8 quantization at FLUX.2-dev's shapes: diffgen-cuda's producer kernel
(kernels/swiglu_quant.py, used by diffgen_cuda.flux2) against the same ops compiled by Inductor and
run eagerly in PyTorch (what diffusers' forward + a quantizer does).

Shapes, 1024x1024 (4096 image + 512 text tokens), hidden 6144, MLP 18432: the single block's
attn.to_out input (4608 tokens, attention 6144 + SwiGLU of 2 x 18432) and the double block's
ff.linear_out input (4096 image / 512 text tokens, SwiGLU of 2 x 18432), the MLP half read as the
strided slice of the projection's output that the blocks hand over; static and per-token scales.
CUDA-graph replay (host_timing.graph_us). Also the share of FP8 codes where the kernel and Inductor
differ. Prints JSON; --out writes it. Needs CUDA SM89+.

    python benchmarks/flux2_swiglu.py --out flux2_swiglu_H200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda"), str(ROOT / "benchmarks")]

from diffgen.numerics.fp8 import quantize_fp8_per_token, quantize_fp8_static  # noqa: E402
from diffgen_cuda.flux2 import swiglu_concat  # noqa: E402
from diffgen_cuda.kernels.swiglu_quant import swiglu_concat_quant  # noqa: E402
from host_timing import graph_us  # noqa: E402

FP8 = torch.float8_e4m3fn
HBM_BYTES_PER_US = 4.8e6  # the H200's peak, 4.8 TB/s


def pytorch_ops(a, h, scale):
    y = swiglu_concat(a, h)
    y = y.reshape(-1, y.shape[-1])
    return (quantize_fp8_static(y, scale, FP8), scale) if scale is not None else quantize_fp8_per_token(y, FP8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    inductor = torch.compile(pytorch_ops)
    with torch.no_grad():
        for m, ka, ki, lead in [(4608, 6144, 18432, 3 * 6144), (4096, 0, 18432, 0), (512, 0, 18432, 0)]:
            g = torch.Generator("cuda").manual_seed(0)
            projection = (torch.randn(m, lead + 2 * ki, device="cuda", generator=g) * 2).bfloat16()
            h = projection[:, lead:]
            a = torch.randn(m, ka, device="cuda", generator=g).bfloat16() if ka else None
            for static in (True, False):
                scale = torch.tensor(6.0 / 448, device="cuda") if static else None
                row = {"M": m, "Ka": ka, "I": ki, "scales": "static" if static else "per-token",
                       "kernel_us": graph_us(lambda: swiglu_concat_quant(a, h, scale, FP8)),
                       "inductor_us": graph_us(lambda: inductor(a, h, scale)),
                       "pytorch_eager_us": graph_us(lambda: pytorch_ops(a, h, scale)),
                       # bf16 a and h read, FP8 written once
                       "memory_bound_us": m * (2 * ka + 4 * ki + ka + ki) / HBM_BYTES_PER_US}
                q, _ = swiglu_concat_quant(a, h, scale, FP8)
                q_ref, _ = inductor(a, h, scale)
                row["codes_differing_from_inductor"] = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
