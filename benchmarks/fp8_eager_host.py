"""Is an eager FLUX step bound by the GPU or by the host? Per-step host enqueue time and wall time.

Runs the fp8_step.py workload (FLUX.1-dev-sized transformer, random weights, 1024x1024, one
forward) eagerly for many steps per variant: bf16, diffgen FP8 static and dynamic (with diffgen-cuda's
FLUX.1 rewrites: Q/K/V fused, the blocks' fused producers).
For each step it records the host time to enqueue the forward (perf_counter before the final
synchronize) and the wall time after it; for each variant the GPU kernel time of one step
(torch.profiler, as fp8_step.py's breakdown). A step whose wall time exceeds its kernel time by
much while its enqueue time is close to the wall time was held up by the host. Between variants,
isolated host costs per call (tiny shapes, so GPU time is negligible) show whether the host itself
slowed down. Prints JSON and writes it with --out. Needs CUDA SM89+ and diffusers.

    python benchmarks/fp8_eager_host.py --out docs/benchmarks/fp8_eager_host_H100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8_step as S  # noqa: E402  (puts core/ and plugins/diffgen-cuda on sys.path)
import host_timing  # noqa: E402

from diffgen_cuda.kernels import fp8_quant  # noqa: E402

FP8 = torch.float8_e4m3fn


def host_us(fn) -> float:
    return round(host_timing.host_us(fn, n=2000, warmup=20), 2)


def host_probe() -> dict:
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    one = torch.ones((), device="cuda")
    rows, cols = torch.ones(64, 1, device="cuda"), torch.ones(1, 256, device="cuda")
    q, wq = x.to(FP8), w.to(FP8)
    return {
        "F.linear_us": host_us(lambda: torch.nn.functional.linear(x, w)),
        "triton_static_quant_us": host_us(lambda: fp8_quant.quant_fp8_static(x, one, FP8)),
        "triton_per_token_quant_us": host_us(lambda: fp8_quant.quant_fp8_per_token(x, FP8)),
        "scaled_mm_us": host_us(lambda: torch._scaled_mm(q, wq.t(), scale_a=one, scale_b=one,
                                                         out_dtype=torch.bfloat16, use_fast_accum=True)),
        "scaled_mm_rowwise_us": host_us(lambda: torch._scaled_mm(q, wq.t(), scale_a=rows, scale_b=cols,
                                                                 out_dtype=torch.bfloat16, use_fast_accum=True)),
    }


def run_steps(model, x, n) -> dict:
    steps = []
    with torch.no_grad():
        for _ in range(3):
            model(**x)
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**x)
            enqueue = time.perf_counter() - t0
            torch.cuda.synchronize()
            steps.append({"enqueue_ms": round(enqueue * 1e3, 2), "wall_ms": round((time.perf_counter() - t0) * 1e3, 2)})
    kernel_ms = S.breakdown(model, x)["kernel_total_ms"]
    walls = [s["wall_ms"] for s in steps]
    return {
        "kernel_total_ms": kernel_ms,
        "wall_median_ms": statistics.median(walls),
        "wall_min_ms": min(walls),
        "enqueue_median_ms": statistics.median(s["enqueue_ms"] for s in steps),
        # steps within 5% of the variant's fastest: the host kept the GPU fed
        "steps_near_min": sum(w <= 1.05 * min(walls) for w in walls),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    model = S.build_model(False)
    x = S.inputs(model, False)
    linears = S.quantized_linears(model)
    amax, _ = S.calibrate(model, linears, x)
    originals = dict(linears)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps_per_variant": args.steps,
              "workload": "fp8_step.py's FLUX.1-dev step, eager", "host_probes": {}, "variants": {}}
    result["host_probes"]["start"] = host_probe()
    for label, static in [("bf16", None), ("diffgen_fp8_static_fused", True), ("diffgen_fp8_dynamic_fused", False),
                          ("bf16_again", None)]:
        if static is not None:
            S.swap(model, S.make_fp8(originals, S.Fp8TritonMethod, static, amax))
            S.rewrite(model)
        v = run_steps(model, x, args.steps)
        result["variants"][label] = v
        result["host_probes"][f"after_{label}"] = host_probe()
        print(json.dumps({label: {k: val for k, val in v.items() if k != "steps"}}), flush=True)
        if static is not None:
            S.unrewrite(model)
            S.swap(model, originals)
            torch.cuda.empty_cache()
    print(json.dumps(result["host_probes"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
