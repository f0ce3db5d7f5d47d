"""Time the int8wo methods against bf16 F.linear at FLUX.1-dev linear shapes (M=4096 tokens); prints JSON.

Run on a CUDA GPU: python examples/diffgen-int8wo/benchmarks/bench_int_mm.py
"""
import json

import torch
import torch.nn.functional as F

from diffgen_int8wo.format import dequantize_weight, quantize_weight
from diffgen_int8wo.methods import w8a8_linear


def bench(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters

out = []
for m, k, n in [(4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072), (4096, 3072, 9216)]:
    w = torch.randn(n, k, device="cuda") * 0.02
    q, s = quantize_weight(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = w.to(torch.bfloat16)
    b16 = bench(lambda: F.linear(x, wb))
    i8 = bench(lambda: w8a8_linear(x, q, s, None))
    ref = bench(lambda: F.linear(x.float(), dequantize_weight(q, s)).to(x.dtype), iters=10)
    y, r = w8a8_linear(x, q, s, None).float(), F.linear(x.float(), dequantize_weight(q, s))
    cos = F.cosine_similarity(y.flatten(), r.flatten(), dim=0).item()
    out.append(dict(M=m, K=k, N=n, bf16_ms=round(b16, 4), w8a8_int_mm_ms=round(i8, 4), reference_ms=round(ref, 4),
                    speedup_vs_bf16=round(b16 / i8, 3), cosine_w8a8_vs_reference=round(cos, 6)))
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": out}, indent=1))
