"""The one-row FP8 GEMV kernel (diffgen_cuda/kernels/fp8_gemv.py) on a GPU: agreement with the
format's definition, time per FLUX modulation shape against bf16 F.linear and torch._scaled_mm
(CUDA-graph replay, so GPU time only), one torch.compile check, and the host cost per call of
each piece of an FP8 linear in eager mode (tiny shapes, wall time per call).

    python benchmarks/fp8_gemv.py --out docs/benchmarks/fp8_gemv_H100.json

docs/benchmarks/fp8_gemv_H100.json came from this script on an NVIDIA H100 80GB HBM3 (torch
2.11.0+cu130, Triton 3.6.0; that run predates the "gpu" field) with the kernels of commit db10d5f,
which divided with Triton's approximate `/`. They now divide IEEE-exactly (ecb4f52), a few more
instructions per activation element; not re-timed.
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

from diffgen.numerics.fp8 import (per_channel_scale, per_tensor_scale, quantize_fp8, quantize_fp8_per_token,  # noqa: E402
                                  quantize_fp8_static)
from diffgen_cuda.kernels.fp8_gemv import fp8_gemv
from host_timing import graph_ms, host_us as _host_us  # noqa: E402
from diffgen_cuda.kernels.fp8_quant import quant_fp8_static
from diffgen.builtin.fp8 import quantize_weight
from diffgen.linear import QuantLinear
from diffgen.quant import LayerSpec, QuantConfig
from diffgen_cuda.fused import Fp8TritonMethod

parser = argparse.ArgumentParser()
parser.add_argument("--out", help="write the JSON here")
args = parser.parse_args()
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
dev = "cuda"
FP8 = torch.float8_e4m3fn


def ref(x, w, ws, xs, b):
    if xs is None:
        q, s = quantize_fp8_per_token(x)
    else:
        q, s = quantize_fp8_static(x, xs), xs
    wd = w.float() * (ws.reshape(-1, 1) if ws.numel() > 1 else ws)
    y = (q.float() * s) @ wd.t()
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


# correctness
errs = []
for (m, k, n) in [(1, 3072, 18432), (2, 3072, 9216), (4, 3000, 1000), (3, 256, 40)]:
    for static in (True, False):
        for per_channel in (True, False):
            for bias in (True, False):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 3
                wf = torch.randn(n, k, device=dev) * 0.02
                ws = per_channel_scale(wf) if per_channel else per_tensor_scale(wf)
                w = quantize_fp8(wf, ws[:, None] if per_channel else ws)
                xs = per_tensor_scale(x) if static else None
                b = torch.randn(n, device=dev, dtype=torch.bfloat16) if bias else None
                for cfg in [(16, 512, 4), (8, 1024, 4), (32, 256, 4)]:
                    y = fp8_gemv(x, w, ws, xs, b, block_n=cfg[0], block_k=cfg[1], num_warps=cfg[2])
                    r = ref(x, w, ws, xs, b)
                    d = (y.float() - r.float()).abs().max().item()
                    rel = d / r.float().abs().max().item()
                    errs.append(dict(m=m, k=k, n=n, static=static, pc=per_channel, bias=bias, cfg=cfg, rel=rel))
out["correct_max_rel"] = max(e["rel"] for e in errs)
out["correct_worst"] = max(errs, key=lambda e: e["rel"])
print(json.dumps(out), flush=True)


# speed per shape, graph-replayed (GPU time only)
speed = []
for (m, k, n) in [(1, 3072, 18432), (1, 3072, 9216), (1, 3072, 6144), (2, 3072, 18432), (1, 5120, 30720)]:
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    wf = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    ws = per_channel_scale(wf)
    w = quantize_fp8(wf, ws[:, None])
    xs = per_tensor_scale(x)
    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
    row = dict(m=m, k=k, n=n, bf16_ms=graph_ms(lambda: F.linear(x, wf, b)))
    q = x.to(FP8)
    sa, sb = torch.ones(m, 1, device=dev), ws.reshape(1, -1).contiguous()
    row["scaled_mm_ms"] = graph_ms(lambda: torch._scaled_mm(q, w.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True))
    best = None
    for cfg in [(16, 512, 4), (8, 512, 4), (8, 1024, 4), (32, 256, 4), (32, 512, 8), (64, 128, 4), (16, 1024, 8), (4, 1024, 4), (16, 256, 4)]:
        for static in (True, False):
            t = graph_ms(lambda: fp8_gemv(x, w, ws, xs if static else None, b, block_n=cfg[0], block_k=cfg[1], num_warps=cfg[2]))
            row[f"gemv_{'s' if static else 'd'}_{cfg[0]}_{cfg[1]}_{cfg[2]}"] = t
    row["weight_GBps_best"] = n * k / min(v for kk, v in row.items() if kk.startswith("gemv_")) / 1e6
    speed.append(row)
    print(json.dumps(row), flush=True)
out["speed"] = speed

# torch.compile of a function that calls the kernel
x = torch.randn(1, 3072, device=dev, dtype=torch.bfloat16)
wf = torch.randn(9216, 3072, device=dev, dtype=torch.bfloat16) * 0.02
ws = per_channel_scale(wf); w = quantize_fp8(wf, ws[:, None]); b = torch.randn(9216, device=dev, dtype=torch.bfloat16)

def f(x):
    return fp8_gemv(F.silu(x), w, ws, None, b) * 2
try:
    cf = torch.compile(f, fullgraph=True)
    out["compile_ok"] = torch.equal(cf(x), f(x))
except Exception as exc:
    out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
print(json.dumps({k: out.get(k) for k in ("compile_ok", "compile_error")}), flush=True)

# host overhead per call (tiny shapes: GPU time negligible; wall per call = host cost)
def host_us(fn):
    return _host_us(fn, n=3000, warmup=50)

xs_ = torch.randn(4, 256, device=dev, dtype=torch.bfloat16)
lin = torch.nn.Linear(256, 256, device=dev, dtype=torch.bfloat16)
layers = {}
for static in (True, False):
    scheme = "per-tensor" if static else "per-channel"
    config = QuantConfig.make("fp8", scheme=scheme, params={"activation_scheme": "static" if static else "dynamic"})
    spec = LayerSpec("l", 256, 256, True, torch.bfloat16)
    with torch.device(dev):
        layer = QuantLinear(spec, Fp8TritonMethod(config, spec), dtype=torch.bfloat16)
    for key, t in quantize_weight(lin.weight.data, scheme).items():
        getattr(layer, key).data = t.reshape(getattr(layer, key).shape)
    layer.bias.data = lin.bias.data
    if static:
        layer.input_scale.data = per_tensor_scale(xs_).reshape(())
    layer.method.process_weights_after_loading(layer)
    layers[static] = layer
q = xs_.to(FP8)
one = torch.ones((), device=dev)
with torch.no_grad():
    host = {
        "F.linear": host_us(lambda: F.linear(xs_, lin.weight, lin.bias)),
        "nn.Linear": host_us(lambda: lin(xs_)),
        "triton_static_quant": host_us(lambda: quant_fp8_static(xs_, one, FP8)),
        "scaled_mm": host_us(lambda: torch._scaled_mm(q, layers[True].weight.t(), scale_a=one, scale_b=one, bias=lin.bias, out_dtype=torch.bfloat16, use_fast_accum=True)),
        "torch_static_quant": host_us(lambda: quantize_fp8_static(xs_, one)),
        "layer_static": host_us(lambda: layers[True](xs_)),
        "layer_dynamic": host_us(lambda: layers[False](xs_)),
        "gemv": host_us(lambda: fp8_gemv(xs_, layers[False].weight, layers[False].weight_scale, None, lin.bias)),
        "is_compiling": host_us(lambda: torch.compiler.is_compiling()),
        "empty": host_us(lambda: torch.empty((4, 256), dtype=FP8, device=dev)),
    }
out["host_us_per_call"] = host
print(json.dumps(host), flush=True)
try:
    import triton
    out["triton"] = triton.__version__
except Exception:
    pass
if args.out:
    open(args.out, "w").write(json.dumps(out, indent=1) + "\n")
