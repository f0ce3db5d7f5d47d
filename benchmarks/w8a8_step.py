"""W8A8 GEMMs at FLUX.1-dev and Wan2.2-A14B linear shapes: msmodelslim's int8 path on NVIDIA
(torch._int_mm) against an FP8 path (torch._scaled_mm, row-wise scales) and bf16.

For each shape [M, K] x [N, K]^T, from one random bf16 weight quantized per channel to int8 (as a
msmodelslim W8A8_DYNAMIC checkpoint holds it) and random bf16 activations:
  bf16                      F.linear
  int_mm_gemm               torch._int_mm on pre-quantized int8 operands (the GEMM alone)
  int_mm_dynamic            diffgen_ascend's msmodelslim-int-mm method, W8A8_DYNAMIC (per-token
                            activation quantization in PyTorch ops + _int_mm + fp32 rescale)
  int_mm_static             the same method, W8A8 static (asymmetric input scale, quant_bias)
  int_mm_dynamic_compiled   int_mm_dynamic with the activation quantization and the rescale
                            through torch.compile (what a fused kernel could reach); --no-compile skips
  fp8_gemm                  torch._scaled_mm row-wise on pre-quantized FP8 operands (the GEMM alone)
  fp8_rowwise               per-token FP8 activation quantization (diffgen-cuda's Triton kernel
                            when importable, else PyTorch) + _scaled_mm. The int8 weight is
                            re-quantized to FP8 per row: NOT exact (int8 has up to 8 significant
                            bits, E4M3 keeps 4); cosine_vs_definition says how far it moves.
cosine_vs_definition compares each path's output with the W8A8_DYNAMIC definition computed in
fp64 (exact integer products). Prints JSON (and writes it with --out). Needs CUDA SM89+ (FP8);
about a minute on an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-ascend"), str(ROOT / "plugins" / "diffgen-cuda")]

from diffgen.linear import QuantLinear  # noqa: E402
from diffgen.quant import LayerSpec, QuantConfig  # noqa: E402
from diffgen_ascend.methods import MsmodelslimIntMMMethod  # noqa: E402

FP8 = torch.float8_e4m3fn
# (model, layer, M, K, N): FLUX.1-dev at 1024x1024 (4096 image + 512 text tokens, hidden 3072);
# Wan2.2-A14B at 480p, 81 frames (21 x 60 x 104 latent / 2x2 patches = 32760 tokens, hidden 5120).
SHAPES = [
    ("flux1", "attn.to_q/k/v/out (double)", 4608, 3072, 3072),
    ("flux1", "ff.net.0.proj", 4096, 3072, 12288),
    ("flux1", "ff.net.2", 4096, 12288, 3072),
    ("flux1", "single proj_mlp", 4608, 3072, 12288),
    ("flux1", "single proj_out", 4608, 15360, 3072),
    ("wan2.2-a14b", "attn1.to_q/k/v/out", 32760, 5120, 5120),
    ("wan2.2-a14b", "ffn.net.0.proj", 32760, 5120, 13824),
    ("wan2.2-a14b", "ffn.net.2", 32760, 13824, 5120),
    ("wan2.2-a14b", "attn2.to_k/v (text)", 512, 4096, 5120),
]


def event_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def int8_layer(scheme: str, w: torch.Tensor, x_amax: float) -> QuantLinear:
    n, k = w.shape
    spec = LayerSpec("bench", k, n, True, torch.bfloat16)
    config = QuantConfig.make("msmodelslim", scheme=scheme, layer_schemes={"bench": scheme},
                              params={"no_weight_offset": ("bench",)})
    with torch.device("meta"):
        layer = QuantLinear(spec, MsmodelslimIntMMMethod(config, spec), dtype=torch.bfloat16)
    ws = w.float().abs().amax(1, keepdim=True) / 127
    wq = torch.round(w.float() / ws).clamp(-127, 127).to(torch.int8)
    tensors = {"weight": wq, "bias": torch.zeros(n, device=w.device, dtype=torch.bfloat16)}
    if scheme == "W8A8":
        s = torch.tensor([2 * x_amax / 255], device=w.device)
        tensors.update(input_scale=s, input_offset=torch.zeros(1, device=w.device),
                       deq_scale=(s * ws.reshape(-1)).float(), quant_bias=torch.zeros(n, dtype=torch.int32, device=w.device))
    else:
        tensors["weight_scale"] = ws.float()
    for key, value in tensors.items():
        setattr(layer, key, torch.nn.Parameter(value, requires_grad=False))
    layer.method.process_weights_after_loading(layer)
    return layer


def quant_int8_per_token(x: torch.Tensor):
    s = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s


def rescale(acc: torch.Tensor, s: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    return (acc.float() * s * ws).to(torch.bfloat16)


def quant_fp8_per_token_torch(x: torch.Tensor):
    s = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448
    return (x.float() / s).clamp(-448, 448).to(FP8), s


def fp8_quantizer():
    try:
        from diffgen_cuda.fused import kernels

        quant = kernels().quant.quant_fp8_per_token
        return "diffgen-cuda triton", lambda x: quant(x, FP8)
    except Exception as exc:  # noqa: BLE001 - no Triton or no diffgen-cuda: PyTorch ops
        return f"pytorch ({type(exc).__name__})", quant_fp8_per_token_torch


def cosine(a, b) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    fp8_name, quant_fp8 = fp8_quantizer()
    compiled_quant = compiled_rescale = None
    if not args.no_compile:
        compiled_quant = torch.compile(quant_int8_per_token, dynamic=True)
        compiled_rescale = torch.compile(rescale, dynamic=True)
    results = []
    for model, layer_name, m, k, n in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        dynamic, static = int8_layer("W8A8_DYNAMIC", w, 4.0), int8_layer("W8A8", w, float(x.abs().max()))
        wq, ws = dynamic.weight.data, dynamic.weight_scale.data.float().reshape(1, -1)
        xq, xs = quant_int8_per_token(x)
        # FP8 weight from the int8 one: per-row scale so the row max maps to 448 (rounds: see docstring).
        w_deq = wq.float() * ws.t()
        w8_scale = (w_deq.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448)
        w8 = (w_deq / w8_scale).clamp(-448, 448).to(FP8)
        x8, x8s = quant_fp8(x)
        w8s_row = w8_scale.reshape(1, -1).contiguous()

        def fp8_path():
            q, s = quant_fp8(x)
            return torch._scaled_mm(q, w8.t(), scale_a=s, scale_b=w8s_row, out_dtype=torch.bfloat16)

        timings = {
            "bf16": event_ms(lambda: F.linear(x, w), args.iters),
            "int_mm_gemm": event_ms(lambda: torch._int_mm(xq, wq.t()), args.iters),
            "int_mm_dynamic": event_ms(lambda: dynamic(x), args.iters),
            "int_mm_static": event_ms(lambda: static(x), args.iters),
            "fp8_gemm": event_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=x8s, scale_b=w8s_row,
                                                          out_dtype=torch.bfloat16), args.iters),
            "fp8_rowwise": event_ms(fp8_path, args.iters),
        }
        if compiled_quant is not None:
            def int_mm_compiled():
                q, s = compiled_quant(x)
                return compiled_rescale(torch._int_mm(q, wq.t()), s, ws)

            timings["int_mm_dynamic_compiled"] = event_ms(int_mm_compiled, args.iters)
        definition = ((xq.double() @ wq.double().t()) * xs.double() * ws.double()).float()
        accuracy = {"int_mm_dynamic": cosine(dynamic(x), definition), "fp8_rowwise": cosine(fp8_path(), definition),
                    "bf16_unquantized": cosine(F.linear(x, w), definition)}
        flops = 2 * m * k * n
        results.append({
            "model": model, "layer": layer_name, "M": m, "K": k, "N": n,
            "ms": {key: round(v, 4) for key, v in timings.items()},
            "tflops": {key: round(flops / v / 1e9, 1) for key, v in timings.items()},
            "speedup_vs_bf16": {key: round(timings["bf16"] / v, 3) for key, v in timings.items() if key != "bf16"},
            "cosine_vs_definition": {key: round(v, 6) for key, v in accuracy.items()},
        })
        torch.cuda.empty_cache()
    report = {"benchmark": "w8a8_step", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "fp8_activation_quantizer": fp8_name, "iters": args.iters, "results": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
