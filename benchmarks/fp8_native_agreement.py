"""Builtin fp8: does the native torch._scaled_mm method agree with the reference, and what does
one linear cost against bf16? Prints JSON (and writes it with --out).

Run on a CUDA GPU with SM89+:  python benchmarks/fp8_native_agreement.py --out docs/benchmarks/X.json
Shapes are FLUX.1-dev linears at 1024x1024 (4096 image + 512 text tokens = 4608 rows).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from diffgen.builtin.fp8_methods import Fp8ReferenceMethod, Fp8ScaledMMMethod, quantize_weight
from diffgen.linear import QuantLinear
from diffgen.quant import LayerSpec, QuantConfig

SHAPES = {  # name: (M, K, N)
    "attn.to_q": (4608, 3072, 3072),
    "ff.net.0.proj": (4608, 3072, 12288),
    "ff.net.2": (4608, 12288, 3072),
    "single.proj_out": (4096, 15360, 3072),
}
CASES = [("per-tensor", "static"), ("per-tensor", "dynamic"), ("per-channel", "dynamic"), ("block", "dynamic")]


def make_layers(scheme: str, activation: str, k: int, n: int, device: str):
    config = QuantConfig.make("fp8", scheme=scheme, params={"activation_scheme": activation,
                                                           **({"block": (128, 128)} if scheme == "block" else {})})
    spec = LayerSpec("layer", k, n, True, torch.bfloat16)
    w = torch.randn(n, k, device=device) * 0.02
    tensors = quantize_weight(w, scheme)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16) * 0.01
    layers = []
    for cls in (Fp8ReferenceMethod, Fp8ScaledMMMethod):
        layer = QuantLinear(spec, cls(config, spec), dtype=torch.bfloat16).to(device)
        for name, t in tensors.items():
            getattr(layer, name).data = t.reshape(getattr(layer, name).shape).to(device)
        layer.bias.data = bias
        if activation == "static":
            layer.input_scale.data = torch.tensor(4.0 / 448, device=device)
        layer.method.process_weights_after_loading(layer)
        layers.append(layer)
    return w, bias, layers


def time_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    device = "cuda"
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "capability": list(torch.cuda.get_device_capability()), "agreement": [], "timing": []}
    for shape_name, (m, k, n) in SHAPES.items():
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        for scheme, activation in CASES:
            w, bias, (ref, native) = make_layers(scheme, activation, k, n, device)
            with torch.no_grad():
                try:
                    y_native = native(x).float()
                except Exception as exc:  # report, do not hide: the support matrix needs it
                    results["agreement"].append({"shape": shape_name, "scheme": scheme, "activation": activation,
                                                 "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
                    continue
                y_ref = ref(x).float()
                y_bf16 = torch.nn.functional.linear(x, w.bfloat16(), bias).float()
                diff = (y_native - y_ref)
                results["agreement"].append({
                    "shape": shape_name, "scheme": scheme, "activation": activation,
                    "native_vs_reference_max_abs": diff.abs().max().item(),
                    "native_vs_reference_rel_rms": (diff.norm() / y_ref.norm()).item(),
                    "native_vs_reference_cosine": torch.nn.functional.cosine_similarity(
                        y_native.flatten(), y_ref.flatten(), dim=0).item(),
                    "native_vs_bf16_cosine": torch.nn.functional.cosine_similarity(
                        y_native.flatten(), y_bf16.flatten(), dim=0).item(),
                })
                if scheme in ("per-tensor", "per-channel") or shape_name == "ff.net.0.proj":
                    t_bf16 = time_ms(lambda: torch.nn.functional.linear(x, w.bfloat16(), bias))
                    t_native = time_ms(lambda: native(x))
                    flop = 2 * m * k * n
                    results["timing"].append({
                        "shape": shape_name, "scheme": scheme, "activation": activation,
                        "bf16_ms": t_bf16, "fp8_layer_ms": t_native,
                        "bf16_tflops": flop / t_bf16 / 1e9, "fp8_layer_tflops": flop / t_native / 1e9,
                        "speedup": t_bf16 / t_native,
                        "note": "fp8 layer = unfused PyTorch activation quantization + torch._scaled_mm, eager",
                    })
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    worst = min((r.get("native_vs_reference_cosine", -math.inf) for r in results["agreement"]), default=-1)
    print(f"worst native-vs-reference cosine: {worst}")


if __name__ == "__main__":
    main()
