"""Where one family's step spends its GPU time: the kernels of ``benchmarks/family_step.py``'s model
under torch.profiler, grouped into GEMM, attention, Triton (diffgen's and Inductor's), copies and
the rest, for a chosen list of variants, eager or compiled, side by side in one process. What
family_step says in one number per variant, this says per kernel class: which part a variant's
speed-up (or its missing speed-up) comes from.

  python benchmarks/family_profile.py --family z_image --variants bf16 fp8_fused --compiled --out z.json

Variants: ``bf16`` (diffusers' blocks), ``fp8_diffusers_blocks`` and ``fp8_fused`` (diffgen's
dynamic FP8 linears, without and with diffgen-cuda's rewrites for the family), as family_step
builds them. ``--attention NAME`` routes every profiled variant's attention to that backend (as
``diffgen --attention NAME`` does; e.g. ``fp8-fa3`` with ``--variants fp8_fused``). Per variant: the profiled steps' GPU time per step by class, and the top kernels by
total time with their call counts. Prints JSON (and writes it with --out).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_step as fs  # noqa: E402  (puts core/ and plugins/diffgen-cuda on the path)

from diffgen.platform import resolve  # noqa: E402
from diffgen.rewrites import apply_rewrites  # noqa: E402

VARIANTS = ("bf16", "fp8_diffusers_blocks", "fp8_fused")
# kernel-name fragments, first match wins; Inductor's kernels (triton_*) are named after the ops they
# fuse ("..._scaled_mm_..." quantizes a GEMM's input, "..._cudnn_attention_..." lays out its inputs),
# so they are one class of their own, and diffgen's Triton kernels (_name_kernel) another
CLASSES = (("inductor", lambda n: n.startswith("triton_")),
           ("copy", lambda n: any(f in n for f in ("memcpy", "memset", "direct_copy", "catarraybatchedcopy"))),
           ("attention", lambda n: any(f in n for f in ("flash", "fmha", "cudnn", "attention", "sdpa", "_attn"))),
           ("gemm", lambda n: any(f in n for f in ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "gemv"))),
           ("diffgen_triton", lambda n: n.startswith("_") and n.endswith("_kernel")))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((label for label, matches in CLASSES if matches(low)), "other")


def profile(net, x, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        for _ in range(3):  # warm-up: compiles and autotunes outside the trace
            net(**x)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                net(**x)
            torch.cuda.synchronize()
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += event.device_time / 1e3  # ms
            entry[1] += 1
    by_class: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_class[kernel_class(name)] += ms / steps
    total = sum(by_class.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    return {"gpu_ms_per_step": total,
            "by_class_ms": {k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "by_class_share": {k: round(v / total, 4) for k, v in by_class.items()} if total else {},
            "top_kernels": [{"name": n[:160], "ms_per_step": round(ms / steps, 3), "calls_per_step": calls / steps,
                             "class": kernel_class(n)} for n, (ms, calls) in top]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(fs.FAMILIES), default="z_image")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["bf16", "fp8_fused"])
    parser.add_argument("--compiled", action="store_true", help="regional torch.compile of every block")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--attention", metavar="NAME", help="route attention to this backend (default: sdpa)")
    parser.add_argument("--out")
    args = parser.parse_args()

    started = time.time()
    spec = fs.FAMILIES[args.family]
    torch.backends.cuda.matmul.allow_tf32 = False
    model, x, image_tokens, text_tokens = fs.build(args.family, args.tiny)
    linears = fs.quantized_linears(model)
    amax, _ = fs.calibrate(model, linears, x)
    results = {"family": args.family, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "compiled": args.compiled, "steps": args.steps, "tiny": args.tiny, "image_tokens": image_tokens,
               "text_tokens": text_tokens, "blocks_timed": sum(len(getattr(model, n)) for n in spec["blocks"].split()),
               "variants": {}}
    fp8_done = fused = False
    for variant in sorted(args.variants, key=VARIANTS.index):  # bf16 first: the swaps below are one-way
        if variant != "bf16" and not fp8_done:
            fs.swap(model, fs.make_fp8(linears, fs.Fp8TritonMethod, False, amax))
            fp8_done = True
        if variant == "fp8_fused" and not fused:
            rewrites = importlib.import_module(spec["rewrites"]).REWRITES
            results["rewritten"] = apply_rewrites(model, rewrites, resolve("cuda")[0])
            fused = True
        def run(variant=variant):
            fs.set_compiled(model, args.compiled, spec["blocks"])
            try:
                results["variants"][variant] = profile(model, x, args.steps)
            finally:
                fs.set_compiled(model, False, spec["blocks"])

        if args.attention:
            results.setdefault("attention", {})[variant] = fs.routed_attention(model, args.attention, None, run)
        else:
            run()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    results["wall_s"] = round(time.time() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
