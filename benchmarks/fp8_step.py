"""One FLUX.1-dev denoising step: BF16 vs diffgen FP8 (static, dynamic) vs torchao float8 rowwise.

Workload: FluxTransformer2DModel with FLUX.1-dev's sizes (19 double + 38 single blocks, hidden
3072, 24 heads x 128, guidance embeds), random bf16 weights built on the GPU, 1024x1024 image
(4096 image tokens) + 512 text tokens, batch 1, one forward. Every variant runs in one process,
side by side, eager and with regional torch.compile (``compile_repeated_blocks``), all with the
same attention (PyTorch SDPA through diffusers' default dispatch). Each step is timed on its own
(synchronized before and after; the medians are the headline numbers), and also back to back, as a
denoising loop runs steps (*_back_to_back_*).

The same layers are quantized in every FP8 variant, torchao included: all linears except
diffgen's DEFAULT_ONLINE_IGNORES for FLUX (embedders, final norm modulation, final projection).
Static scales are calibrated like ModelOpt does (input amax / 448, from one forward).
The diffgen variants get diffgen-cuda's FLUX.1 rewrites after quantizing, as load_transformer
applies them (diffgen_cuda.flux1): Q/K/V fused into one GEMM, and blocks whose FP8 linears take
their input prepared by fused producers (LayerNorm + modulation and GELU (+ concat) quantized in
the same pass; compiled, Inductor's fusion or the kernel's operator) unless the label says
"no_fused_blocks" (diffusers' block forward). The rewritten blocks also run the attention prologue
(RMSNorm of q and k, RoPE) in diffgen-cuda's one-pass kernel, unless the label says
"no_prologue_kernel" (--ablate-prologue): that part is not FP8's, and the BF16 baseline (diffusers'
model as is) does not get it. The one-row modulation linears keep 16-bit activations
(diffgen.builtin.fp8_methods.WEIGHT_ONLY_ROWS) and run diffgen-cuda's GEMV kernel, eager and
compiled; compiled per-token rows wider than diffgen_cuda.fused.WIDE_ROW that no producer
quantized go to the per-token kernel.

Prints JSON (and writes it with --out). Needs CUDA SM89+, diffusers, and torchao for its variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda")]

from diffgen.builtin.fp8_methods import Fp8ScaledMMMethod, quantize_weight  # noqa: E402
from diffgen.linear import QuantLinear, replace_module  # noqa: E402
from diffgen.platform import resolve  # noqa: E402
from diffgen.quant import LayerSpec, QuantConfig, default_online_ignore  # noqa: E402
from diffgen.rewrites import apply_rewrites, undo_rewrites  # noqa: E402
from diffgen_cuda import block_rewrite, flux1  # noqa: E402
from diffgen_cuda.fused import Fp8TritonMethod  # noqa: E402
from host_timing import event_ms  # noqa: E402

DEV = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
           joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
           axes_dims_rope=(16, 56, 56))
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512


def build_model(tiny: bool):
    from diffusers import FluxTransformer2DModel

    cfg = dict(DEV)
    if tiny:  # a smoke-test size for machines without a big GPU
        cfg.update(num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=256,
                   pooled_projection_dim=128)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(**cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for name, p in model.named_parameters():  # diffusers zero-initialises some layers; use real-ish weights
        if p.dim() == 2:
            p.normal_(0, 0.02)
    return model


def inputs(model, tiny: bool):
    g = torch.Generator("cuda").manual_seed(1)
    cfg = model.config
    img, txt = (64, 32) if tiny else (IMAGE_TOKENS, TEXT_TOKENS)
    side = int(img ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().cuda()
    return dict(
        hidden_states=torch.randn(1, img, cfg.in_channels, device="cuda", generator=g, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, device="cuda", generator=g,
                                          dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device="cuda", generator=g, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
        img_ids=img_ids, txt_ids=torch.zeros(txt, 3, device="cuda"),
        guidance=torch.tensor([3.5], device="cuda", dtype=torch.bfloat16),
        return_dict=False,
    )


def quantized_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and not default_online_ignore(type(model).__name__, n)}


def calibrate(model, linears, x):
    """Input amax per layer (ModelOpt's max calibration) and the GEMM shapes of the step."""
    amax, shapes, hooks = {}, defaultdict(int), []
    for name, m in linears.items():
        def hook(mod, args, name=name):
            a = args[0]
            amax[name] = a.abs().amax().float()
            shapes[(a.numel() // a.shape[-1], mod.in_features, mod.out_features)] += 1
        hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    return amax, dict(shapes)


def make_fp8(linears, method_cls, static: bool, amax) -> dict[str, QuantLinear]:
    out = {}
    for name, lin in linears.items():
        scheme = "per-tensor" if static else "per-channel"
        config = QuantConfig.make("fp8", scheme=scheme, params={"activation_scheme": "static" if static else "dynamic"})
        spec = LayerSpec(name, lin.in_features, lin.out_features, lin.bias is not None, torch.bfloat16)
        with torch.device("cuda"):
            layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.bfloat16)
        for key, t in quantize_weight(lin.weight.data, scheme).items():
            getattr(layer, key).data = t.reshape(getattr(layer, key).shape)
        if lin.bias is not None:
            layer.bias.data = lin.bias.data
        if static:
            layer.input_scale.data = (amax[name] / 448).reshape(())
        layer.method.process_weights_after_loading(layer)
        out[name] = layer
    return out


def swap(model, modules: dict):
    for name, m in modules.items():
        replace_module(model, name, m)


def rewrite(model) -> dict[str, str]:
    """diffgen-cuda's FLUX.1 rewrites, as load_transformer applies them."""
    return apply_rewrites(model, flux1.REWRITES, resolve("cuda")[0])


def unrewrite(model):
    """Take the rewrites out again, the fused Q/K/V included, so the original layers can be swapped
    back in (swap puts back the parts the fusion deleted)."""
    undo_rewrites(model)
    for module in model.modules():
        if type(module).__name__ == flux1.FuseFluxAttentionQKV.block_class and module.fused_projections:
            for target, _ in flux1.QKV_GROUPS:
                if hasattr(module, target):
                    delattr(module, target)
            module.fused_projections = False


def set_prologue_kernel(model, kernels):
    for block in blocks(model):
        if hasattr(block, "diffgen_qk_norm_rope"):
            block.diffgen_qk_norm_rope = kernels


def time_step(model, x, warmup=3, iters=10) -> tuple[list[float], list[float]]:
    """GPU time of each step (CUDA events), and the host's time to enqueue it: a step whose enqueue
    time reaches its GPU time is bound by the host's launches, not by the GPU."""
    with torch.no_grad():
        for _ in range(warmup):
            model(**x)
        torch.cuda.synchronize()
        times, enqueue = [], []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            model(**x)
            enqueue.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return times, enqueue


def time_back_to_back(model, x, steps, runs=3) -> list[float]:
    """Milliseconds per step over ``steps`` steps enqueued back to back, as a denoising loop runs
    them (diffusers' FLUX loop does not synchronize between steps): one step's launches overlap the
    previous step's GPU work, so a step costs max(host, GPU) rather than their sum at the edges."""
    def loop():
        for _ in range(steps):
            model(**x)

    with torch.no_grad():
        torch.cuda.synchronize()
        return [event_ms(loop) / steps for _ in range(runs)]


def blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def set_compiled(model, on: bool):
    torch._dynamo.reset()
    for b in blocks(model):
        if on:
            b.compile()
        else:
            b._compiled_call_impl = None


def breakdown(model, x) -> dict:
    """CUDA kernel time of one step by class: GEMM, attention, other."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**x)
        torch.cuda.synchronize()
    cls = defaultdict(float)
    for evt in prof.key_averages():
        name = evt.key.lower()
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if name.startswith("triton_"):  # Inductor's kernels, named after every op they fuse
            cls["other_ms"] += t / 1e3
        elif any(k in name for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
            cls["attention_ms"] += t / 1e3
        elif any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "matmul")):
            cls["gemm_ms"] += t / 1e3
        else:
            cls["other_ms"] += t / 1e3
    # Against the wall time this shows whether eager was bound by the GPU or by the host's launches.
    cls["kernel_total_ms"] = sum(cls.values())
    return dict(cls)


def gemm_table(shapes, reps=30) -> list[dict]:
    """TFLOP/s per GEMM shape: bf16 F.linear, FP8 GEMM alone, and each diffgen FP8 layer."""
    rows = []
    for (m, k, n), count in sorted(shapes.items()):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        lin = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
        lin.weight.data = w
        amax = {"l": x.abs().amax().float()}
        static = make_fp8({"l": lin}, Fp8TritonMethod, True, amax)["l"]
        dynamic = make_fp8({"l": lin}, Fp8TritonMethod, False, amax)["l"]
        dyn_unfused = make_fp8({"l": lin}, Fp8ScaledMMMethod, False, amax)["l"]
        q = x.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        cases = {
            "bf16": lambda: F.linear(x, w, lin.bias),
            "fp8_gemm_only_rowwise": lambda: torch._scaled_mm(q, static.weight.t(), scale_a=sa, scale_b=sb,
                                                              bias=lin.bias, out_dtype=torch.bfloat16,
                                                              use_fast_accum=True),
            "fp8_static_fused_layer": lambda: static(x),
            "fp8_dynamic_fused_layer": lambda: dynamic(x),
            "fp8_dynamic_unfused_layer": lambda: dyn_unfused(x),
        }
        row = {"M": m, "K": k, "N": n, "count_per_step": count}
        with torch.no_grad():
            for label, fn in cases.items():
                ms = statistics.median(_time_fn(fn, reps))
                row[f"{label}_ms"] = ms
                row[f"{label}_tflops"] = 2 * m * k * n / ms / 1e9
        rows.append(row)
    return rows


def _time_fn(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return [event_ms(fn) for _ in range(reps)]


def weight_bytes(model) -> int:
    total = 0
    for mod in model.modules():
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            if not (isinstance(mod, QuantLinear) and t is getattr(mod, "_scale_b", None)):
                total += t.numel() * t.element_size()
    return total


def cosine(a, b) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-torchao", action="store_true")
    parser.add_argument("--scales", nargs="+", choices=["static", "dynamic"], default=["static", "dynamic"],
                        help="which diffgen variants to run (a full run does not fit 10 minutes)")
    parser.add_argument("--skip-extras", action="store_true",
                        help="only bf16, the fused diffgen variants and torchao")
    parser.add_argument("--ablate-prologue", action="store_true",
                        help="also run the fused variants with diffusers' attention prologue instead of "
                             "diffgen-cuda's qk_norm_rope kernel (what that kernel gains)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--eager-iters", type=int, default=20, help="eager steps vary more with the host")
    args = parser.parse_args()

    started = time.time()
    model = build_model(args.tiny)
    x = inputs(model, args.tiny)
    linears = quantized_linears(model)
    amax, shapes = calibrate(model, linears, x)
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "workload": "FLUX.1-dev-sized FluxTransformer2DModel, random bf16 weights, 1024x1024 (4096 image + "
                    "512 text tokens), batch 1, one forward" if not args.tiny else "tiny smoke test",
        "attention": "PyTorch SDPA via diffusers' default attention dispatch, identical for every variant",
        "compile": "regional: torch.compile of every transformer block (compile_repeated_blocks style)",
        "quantized_linears": len(linears), "all_linears": sum(type(m) is torch.nn.Linear for m in model.modules()),
        "variants": {},
    }
    with torch.no_grad():
        reference = model(**x)[0]
    result["weight_bytes_bf16"] = weight_bytes(model)
    originals = dict(linears)

    def measure(label, compiled_too=True, eager=True):
        entry = {}
        if eager:
            entry["eager_ms"], entry["eager_enqueue_ms"] = time_step(model, x, iters=args.eager_iters)
            entry["eager_back_to_back_ms"] = time_back_to_back(model, x, 10, runs=2)
            with torch.no_grad():
                out = model(**x)[0]
            entry["cosine_vs_bf16"] = cosine(out, reference)
            entry["weight_bytes"] = weight_bytes(model)
            entry["breakdown_eager"] = breakdown(model, x)
        if compiled_too and not args.no_compile:
            set_compiled(model, True)
            t0 = time.time()
            entry["compile_s_first_calls"] = None
            entry["compiled_ms"], _ = time_step(model, x, warmup=3, iters=args.iters)
            entry["compile_s_first_calls"] = time.time() - t0
            entry["compiled_back_to_back_ms"] = time_back_to_back(model, x, args.iters)
            with torch.no_grad():
                entry["cosine_vs_bf16_compiled"] = cosine(model(**x)[0], reference)
            entry["breakdown_compiled"] = breakdown(model, x)
            set_compiled(model, False)
        for k in ("eager_ms", "eager_enqueue_ms", "compiled_ms", "eager_back_to_back_ms", "compiled_back_to_back_ms"):
            if k in entry:
                entry[k.replace("_ms", "_median_ms")] = statistics.median(entry[k])
        result["variants"][label] = entry
        print(json.dumps({label: {k: v for k, v in entry.items() if "median" in k or "cosine" in k}}), flush=True)
        if args.out:  # keep what is measured even if a later variant fails or time runs out
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    measure("bf16")
    variants = [("diffgen_fp8_static_fused", Fp8TritonMethod, True),
                ("diffgen_fp8_dynamic_fused", Fp8TritonMethod, False),
                ("diffgen_fp8_dynamic_unfused_builtin", Fp8ScaledMMMethod, False)]
    for label, cls, static in variants[:2] if args.skip_extras else variants:
        if ("static" if static else "dynamic") not in args.scales:
            continue
        swap(model, make_fp8(originals, cls, static, amax))
        rewritten = list(rewrite(model).values())
        result.setdefault("qkv_fused_attentions", rewritten.count("flux1-fused-qkv"))
        result.setdefault("fused_blocks", len(rewritten) - rewritten.count("flux1-fused-qkv"))
        measure(label, compiled_too=cls is Fp8TritonMethod)
        if cls is Fp8TritonMethod and args.ablate_prologue:
            kernels = block_rewrite.prologue_kernels(resolve("cuda")[0])
            set_prologue_kernel(model, None)  # diffusers' ops then
            try:
                measure(f"{label}_no_prologue_kernel")
            finally:
                set_prologue_kernel(model, kernels)
        if cls is Fp8TritonMethod and not args.skip_extras:
            # The same layers with diffusers' block forward: what the fused producers gain.
            undo_rewrites(model)
            measure(f"{label}_no_fused_blocks")
        unrewrite(model)
        swap(model, originals)
        torch.cuda.empty_cache()
    if not args.no_torchao:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            names = set(originals)
            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=lambda m, fqn: fqn in names)
            measure("torchao_float8_rowwise")
        except Exception as exc:  # say why instead of dropping the peer silently
            result["variants"]["torchao_float8_rowwise"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["gemm_shapes"] = gemm_table(shapes)
    bf16 = result["variants"]["bf16"]
    ratios = {}
    for label, v in result["variants"].items():
        if "eager_median_ms" in v:
            ratios[f"{label}_eager_speedup_vs_bf16_eager"] = bf16["eager_median_ms"] / v["eager_median_ms"]
        if "compiled_median_ms" in v and "compiled_median_ms" in bf16:
            ratios[f"{label}_compiled_speedup_vs_bf16_compiled"] = bf16["compiled_median_ms"] / v["compiled_median_ms"]
        for mode in ("eager", "compiled"):
            key = f"{mode}_back_to_back_median_ms"
            if key in v and key in bf16:
                ratios[f"{label}_{mode}_back_to_back_speedup_vs_bf16"] = bf16[key] / v[key]
        if "weight_bytes" in v and not label.startswith("torchao"):  # its tensor subclass reports bf16 sizes
            ratios[f"{label}_weight_bytes_vs_bf16"] = v["weight_bytes"] / result["weight_bytes_bf16"]
    tao = result["variants"].get("torchao_float8_rowwise", {})
    for label in ("diffgen_fp8_static_fused", "diffgen_fp8_dynamic_fused"):
        v = result["variants"].get(label, {})
        for mode in ("eager", "compiled"):
            if f"{mode}_median_ms" in v and f"{mode}_median_ms" in tao:
                ratios[f"{label}_{mode}_speedup_vs_torchao"] = tao[f"{mode}_median_ms"] / v[f"{mode}_median_ms"]
    result["ratios"] = ratios
    result["wall_s"] = time.time() - started
    text = json.dumps(result, indent=2)
    print(json.dumps(ratios, indent=2))
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
