"""Weight-only NVFP4 (``nvfp4-triton-dequant``): does dequantizing a large layer in L2-sized row
chunks, each followed at once by its GEMM, cost less than one pass over the whole layer?

The offered path writes the layer's whole bf16 weight (up to 132 MB at FLUX.1's widths, far over the
H200's 50 MB L2) and then runs one cuBLAS GEMM: the pass is bound by HBM writes, 5-7% of a step. The
idea measured here: a chunk of at most ``--chunk-mb`` of bf16 rows is written into L2, the GEMM of
those rows reads it from there at once, and the dirty lines go back to HBM while that compute-bound
GEMM runs. Each chunk's GEMM writes its columns of the one output (``torch.mm(out=)`` on a slice).

Per FLUX.1 shape at 4,608 tokens (M), on bf16 activations: the bf16 GEMM alone, the pass alone,
the offered pass + GEMM, and pass + GEMM per chunk for each chunk size; the time over the bf16 GEMM,
and the largest difference between chunked and whole outputs (cuBLAS may pick another kernel for a
narrower N, so the bits may differ in the last place). Two timings each: ``ms``, eager calls with
L2 flushed (a 256 MB write) before each, launch cost included; ``graph_ms``, a CUDA graph of 20
calls back to back, GPU time alone (a chunk's launches cost nothing there; in a compiled step they
overlap the GPU's work). A session at 5953f0c measured chunks of 512-4,096 rows eagerly without the
flush (docs/benchmarks/w4_dequant_H200.json): slower than one pass except 4,096 rows of the
3072x12288 layer (0.499 against 0.513 ms). Prints JSON (and writes it with --out). Needs CUDA SM89+
and Triton.

    python benchmarks/w4a16_chunks.py --out docs/benchmarks/w4a16_chunks_H200.json    # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda")]

from diffgen.numerics.nvfp4 import quantize_nvfp4  # noqa: E402
from diffgen_cuda import packed4  # noqa: E402
from diffgen_cuda.kernels import w4_gemm  # noqa: E402
from host_timing import event_ms, graph_ms  # noqa: E402

TOKENS = 4608
SHAPES = [(9216, 3072), (12288, 3072), (21504, 3072), (3072, 12288), (3072, 15360)]  # (N, K) of FLUX.1's linears
CHUNK_MB = (12, 16, 24, 32, 48)


def timed_ms(fn, flush: torch.Tensor, repeats: int) -> float:
    """Median of ``repeats`` event-timed calls, L2 flushed before each."""
    fn()
    times = []
    for _ in range(repeats):
        flush.fill_(1)
        times.append(event_ms(fn))
    return statistics.median(times)


def timings(fn, flush, repeats: int) -> dict:
    return {"ms": timed_ms(fn, flush, repeats), "graph_ms": graph_ms(fn, calls=10, replays=10)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    rows_out = []
    with torch.no_grad():
        for n, k in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(0)
            w16 = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
            packed, scale, global_scale = quantize_nvfp4(w16)
            row = global_scale.float().reshape(-1).expand(n).contiguous()
            one = torch.ones((), device="cuda")
            x = torch.randn(TOKENS, k, device="cuda", generator=g, dtype=torch.bfloat16)
            wd = w4_gemm.w4_dequantize(packed, scale, one, k, torch.bfloat16, row)
            whole = F.linear(x, wd)
            result = {"n": n, "k": k, "m": TOKENS, "weight_mb": round(n * k * 2 / 2**20, 1)}
            kind = dict(codes=packed4.E2M1, scales=packed4.E4M3, group=16, row_factor=row)

            def linear(chunk_bytes=None):
                return packed4.linear(x, packed, scale, one, None, k, chunk_bytes=chunk_bytes, **kind)

            result["bf16_gemm"] = bf16 = timings(lambda: F.linear(x, wd), flush, args.repeats)
            result["pass"] = timings(lambda: w4_gemm.w4_dequantize(packed, scale, one, k, torch.bfloat16, row),
                                     flush, args.repeats)
            result["pass_gemm"] = timings(linear, flush, args.repeats)
            result["pass_gemm_over_bf16"] = {t: result["pass_gemm"][t] / bf16[t] for t in bf16}
            for mb in CHUNK_MB:
                rows = packed4.chunk_rows(n, k, mb << 20)
                if rows is None:
                    continue
                entry = timings(lambda: linear(mb << 20), flush, args.repeats)
                entry.update(rows=rows, chunks=-(-n // rows), over_bf16={t: entry[t] / bf16[t] for t in bf16},
                             max_abs_diff_vs_whole=(linear(mb << 20).float() - whole.float()).abs().max().item())
                result[f"chunks_{mb}mb"] = entry
            rows_out.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    out = {"benchmark": "w4a16_chunks", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "rows": rows_out}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
