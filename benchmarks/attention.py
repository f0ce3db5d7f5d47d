"""FP8 attention (diffgen-cuda's INT8 Q.K^T / FP8 P.V Triton kernel, and cuDNN's fused FP8 kernel
through ``--attention fp8-cudnn`` where the cuDNN frontend is installed) against PyTorch's bf16 SDPA
(cuDNN and flash backends) at each family's default-resolution attention shapes.

Shapes (batch 1, head dim 128; tokens = latent tokens + text tokens of the joint attention):
  flux1       24 heads, 4096 + 512 = 4608                     (1024x1024)
  qwen_image  24 heads, 83*83 + 256 = 7145                    (1328x1328; 256 text tokens assumed)
  wan_self    40 heads, 21*45*80 = 75600                      (Wan2.2 A14B, 1280x720, 81 frames)
  wan_cross   40 heads, 75600 queries x 512 text keys
  hunyuan     24 heads, 33*45*80 + 256 = 119056               (HunyuanVideo 1280x720, 129 frames)
Per shape: ms (median of CUDA-event timings), TFLOP/s (4*B*H*Lq*Lk*D / t), the speedup over the
fastest bf16 SDPA backend; for the kernel each launch config, the whole call (pre-pass: K mean, V
amax, INT8/FP8 quantization; then attention) and the attention kernel alone; and the error on a
slice (the first 512 queries of two heads, all keys) against fp32 attention: relative RMS, cosine,
max abs, for the kernel and for bf16 SDPA. ``cudnn_fp8``: the whole call (per-tensor E4M3
quantization of q, k, v in PyTorch ops, then cuDNN's graph) and cuDNN's graph alone on operands
quantized once, or the reason it did not run. ``fa3_fp8``: the whole call of the ``fp8-fa3``
backend (per-head E4M3 by two Triton passes per tensor, then FlashAttention-3's FP8 kernel by
its own ``flash_attn_func``), its kernel alone on operands quantized once, and ``fa3_bf16``: PyTorch's flash SDPA once FA3
is its implementation (FA3's bf16 kernel), or the reason it did not run (FA3 must be installed as
``flash_attn_interface``). Inputs are Gaussian with 4 key channels offset by +8
(DiT keys carry such shared offsets; smoothing removes them).

    python benchmarks/attention.py --out docs/benchmarks/attention_H200.json     # ~1-2 minutes
    python benchmarks/attention.py --quick                                        # FLUX.1 and Wan cross only
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

from diffgen_cuda import attention_cudnn_fp8 as cudnn_fp8  # noqa: E402
from diffgen_cuda import attention_fa3_fp8 as fa3_fp8  # noqa: E402
from diffgen_cuda import attention_fp8 as fp8  # noqa: E402

SHAPES = {  # name: (heads, query tokens, key tokens)
    "flux1": (24, 4608, 4608),
    "qwen_image": (24, 7145, 7145),
    "wan_self": (40, 75600, 75600),
    "wan_cross": (40, 75600, 512),
    "hunyuan": (24, 119056, 119056),
}
QUICK = ("flux1", "wan_cross")
HEAD_DIM = 128


def timed_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):  # q, k, v [B, H, L, D]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def slice_error(got: torch.Tensor, q, k, v, rows: int = 512, heads: int = 2) -> dict:
    """got [B, H, Lq, D] against fp32 attention of its first ``rows`` queries of ``heads`` heads."""
    want = F.scaled_dot_product_attention(q[:, :heads, :rows].float(), k[:, :heads].float(), v[:, :heads].float())
    got = got[:, :heads, :rows].double().flatten()
    want = want.double().flatten()
    return {"rel_rms": ((got - want).norm() / want.norm()).item(),
            "cosine": F.cosine_similarity(got, want, dim=0).item(),
            "max_abs": (got - want).abs().max().item()}


def bench_shape(name: str, configs: list[str], repeats: int) -> dict:
    heads, lq, lk = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, lq, heads, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, lk, heads, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    k[..., :4] += 8.0
    v = torch.randn(1, lk, heads, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's [B, H, L, D]
    flops = 4.0 * heads * lq * lk * HEAD_DIM
    long = lq * lk > 1e9
    reps = max(2, repeats // 4) if long else repeats
    row: dict = {"shape": name, "heads": heads, "lq": lq, "lk": lk, "head_dim": HEAD_DIM, "repeats": reps}
    from torch.nn.attention import SDPBackend

    for label, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        try:
            fn = sdpa(backend)
            ms = timed_ms(lambda: fn(qh, kh, vh), reps)
            row[label] = {"ms": ms, "tflops": flops / ms / 1e9, **slice_error(fn(qh, kh, vh), qh, kh, vh)}
        except Exception as exc:  # a backend may refuse a shape; say so and go on
            row[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    row["sdpa_flash"]["implementation"] = "FA3" if fa3_fp8.is_active() else "PyTorch's own (FA2)"
    best_sdpa = min((r["ms"] for key, r in row.items() if key.startswith("sdpa") and "ms" in r), default=None)
    row["fp8"] = {}
    for config in configs:
        try:
            ms = timed_ms(lambda: fp8.attention_fp8(q, k, v, config=config), reps)
            kernel_ms = timed_ms(_kernel_only(q, k, v, config), reps)
            out = fp8.attention_fp8(q, k, v, config=config).transpose(1, 2)
            result = {"ms": ms, "tflops": flops / ms / 1e9, "kernel_ms": kernel_ms,
                      "kernel_tflops": flops / kernel_ms / 1e9, **slice_error(out, qh, kh, vh)}
            if best_sdpa:
                result["speedup_vs_best_sdpa"] = best_sdpa / ms
            row["fp8"][config] = result
        except Exception as exc:
            row["fp8"][config] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    row["cudnn_fp8"] = _cudnn_fp8(q, k, v, qh, kh, vh, flops, reps, best_sdpa)
    row["fa3_fp8"] = _fa3_fp8(q, k, v, qh, kh, vh, flops, reps, best_sdpa)
    return row


def _library_row(module, measure) -> dict:
    """A library backend's row: why it does not run here, what ``measure()`` returns, or its error."""
    from diffgen.platform import resolve

    reason = module.unavailable_reason(resolve("cuda")[0])
    if reason is not None:
        return {"unavailable": reason}
    try:
        return measure()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


def _fa3_fp8(q, k, v, qh, kh, vh, flops: float, reps: int, best_sdpa: float | None) -> dict:
    def measure():
        from torch.nn.attention import SDPBackend

        ms = timed_ms(lambda: fa3_fp8.attention_fa3_fp8(q, k, v), reps)
        args = fa3_fp8.prepare(q, k, v)
        kernel_ms = timed_ms(lambda: fa3_fp8.run_prepared(args, HEAD_DIM ** -0.5), reps)
        fa3_fp8.activate()
        flash = sdpa(SDPBackend.FLASH_ATTENTION)  # FA3's bf16 kernel, now that FA3 is PyTorch's flash
        bf16_ms = timed_ms(lambda: flash(qh, kh, vh), reps)
        result = {"ms": ms, "tflops": flops / ms / 1e9, "kernel_ms": kernel_ms,
                  "kernel_tflops": flops / kernel_ms / 1e9,
                  **slice_error(fa3_fp8.attention_fa3_fp8(q, k, v).transpose(1, 2), qh, kh, vh),
                  "fa3_bf16": {"ms": bf16_ms, "tflops": flops / bf16_ms / 1e9,
                               **slice_error(flash(qh, kh, vh), qh, kh, vh)}}
        if best_sdpa:
            result["speedup_vs_best_sdpa"] = best_sdpa / ms
        return result

    return _library_row(fa3_fp8, measure)


def _cudnn_fp8(q, k, v, qh, kh, vh, flops: float, reps: int, best_sdpa: float | None) -> dict:
    def measure():
        ms = timed_ms(lambda: cudnn_fp8.attention_cudnn_fp8(q, k, v), reps)
        quantized = [cudnn_fp8.quantize_per_tensor(x) for x in (q, k, v)]
        args = [x8 for x8, _ in quantized] + [d for _, d in quantized] + [q.dtype, q.shape[-1] ** -0.5]
        kernel_ms = timed_ms(lambda: cudnn_fp8.run_quantized(*args), reps)
        out = cudnn_fp8.attention_cudnn_fp8(q, k, v).transpose(1, 2)
        result = {"ms": ms, "tflops": flops / ms / 1e9, "kernel_ms": kernel_ms, "kernel_tflops": flops / kernel_ms / 1e9,
                  **slice_error(out, qh, kh, vh)}
        if best_sdpa:
            result["speedup_vs_best_sdpa"] = best_sdpa / ms
            result["kernel_speedup_vs_best_sdpa"] = best_sdpa / kernel_ms
        try:  # the same graph on heads-first operands ([B, H, L, D] in memory): does cuDNN prefer them?
            heads_first = [x8.transpose(1, 2).contiguous().transpose(1, 2) for x8 in args[:3]] + args[3:]
            result["kernel_heads_first_ms"] = timed_ms(lambda: cudnn_fp8.run_quantized(*heads_first), reps)
        except Exception as exc:
            result["kernel_heads_first_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return result

    return _library_row(cudnn_fp8, measure)


def _kernel_only(q, k, v, config: str):
    """The attention kernel alone, on operands quantized once (what the pre-pass leaves)."""
    from diffgen_cuda.kernels import attention_fp8 as kernels

    cfg = fp8.launch_config(config)
    B, _, H, D = q.shape
    mean = k.mean(dim=1, dtype=torch.float32).reshape(B * H, D).contiguous()
    sv = (torch.linalg.vector_norm(v, ord=float("inf"), dim=1).float().reshape(B * H, D) / 448)
    sv = sv.clamp_min(1e-12).contiguous()
    k8, sk, v8 = kernels.quantize_kv(k, v, False, cfg["block_n"], mean, sv)
    out = torch.empty_like(q)

    def run():  # with Q's quantization, which is inside the attention kernel
        kernels.attention(q, k8, sk, v8, sv, out, False, D ** -0.5, k.shape[1], **cfg)
    return run


def config_name(name: str) -> str:
    try:
        fp8.launch_config(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, fewer repeats")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="a subset of the shapes")
    parser.add_argument("--configs", nargs="+", type=config_name, default=list(fp8.CONFIGS), metavar="CONFIG",
                        help="the kernel's launch configs to sweep, m<BLOCK_M>n<BLOCK_N>w<warps>s<stages>[-option...] "
                             f"(options: {', '.join(fp8.OPTIONS)}; default: {len(fp8.CONFIGS)} in CONFIGS)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case (a quarter at long shapes)")
    args = parser.parse_args()
    import triton

    platform = torch.cuda.get_device_properties(0)
    reason = fp8.unavailable_reason(__import__("diffgen.platform", fromlist=["resolve"]).resolve("cuda")[0])
    if reason:
        raise SystemExit(f"attention.py: {reason}")
    shapes = args.shapes or (list(QUICK) if args.quick else list(SHAPES))
    result = {"benchmark": "attention", "gpu": platform.name, "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "triton": triton.__version__, "default_config": fp8.DEFAULT_CONFIG,
              "rows": []}
    with torch.no_grad():
        for name in shapes:
            result["rows"].append(bench_shape(name, args.configs, 5 if args.quick else args.repeats))
            print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
            if args.out:  # after every shape, so a run stopped by a time limit keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
