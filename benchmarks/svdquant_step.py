"""One FLUX.1-dev-sized denoising step with SVDQuant int4 r32 weights on a GPU nunchaku has no
kernels for (Hopper), against bf16; prints JSON (and writes it with --out).

Real FLUX.1-dev widths (3072, 24 heads, MLP 12288, T5 4096, CLIP 768), a subset of the blocks
(--double / --single), random bf16 weights; 1024x1024 = 4096 image tokens + 512 text tokens.
Every block linear is quantized as nunchaku's exporter does it (smoothing, rank-32 SVD, int4 per
64 residual; AdaLN modulation AWQ W4A16) and runs diffgen-nunchaku's weight-only method
(``svdq-packed4``: x / smooth through diffgen-cuda's packed4 kernel plus the low-rank branch).
Variants: bf16, svdq-packed4 (weight-only) and svdq-packed4-w4a8 (the same weights on FP8 tensor
cores: per-row FP8 weight, per-token FP8 activations), eager and torch.compile (regional: every block). Reports step
ms, the ratio, weight bytes of the quantized layers against bf16, and cosine vs bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for sub in ("core", "plugins/diffgen-cuda", "plugins/diffgen-nunchaku"):
    sys.path.insert(0, str(ROOT / sub))

from diffgen.linear import QuantLinear, replace_module  # noqa: E402
from diffgen.numerics.int4 import pack_int4  # noqa: E402
from diffgen.quant import LayerSpec, QuantConfig  # noqa: E402
from diffgen_nunchaku.packing import nibbles_to_plain  # noqa: E402
from diffgen_nunchaku.weight_only import AwqPacked4Method, SvdqPacked4Method, SvdqPacked4W4A8Method  # noqa: E402

RANK = 32
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")


def svdq_layer(name: str, lin: torch.nn.Linear, method_cls=SvdqPacked4Method) -> QuantLinear:
    w = lin.weight.data.float()
    n, k = w.shape
    smooth = w.abs().amax(0).clamp(min=1e-4).sqrt()
    what = w * smooth
    u, s, v = torch.svd_lowrank(what, q=RANK + 8, niter=2)
    up, l2 = u[:, :RANK] * s[:RANK], v[:, :RANK].t()
    res = (what - up @ l2).reshape(n, k // 64, 64)
    scales = (res.abs().amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
    codes = torch.round(res / scales.float()[..., None]).clamp(-8, 7).reshape(n, k).to(torch.int8)
    spec = LayerSpec(name, k, n, lin.bias is not None, torch.bfloat16)
    config = QuantConfig.make("svdquant", scheme="int4", params={"precision": "int4", "rank": RANK},
                              layer_schemes={name: f"svdq {k}r{RANK}"})
    with torch.device("cuda"):
        layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.bfloat16)
    layer.qweight.data = pack_int4(codes)
    layer.wscales.data = scales
    layer.smooth_factor.data = smooth.to(torch.bfloat16)
    layer.proj_down.data = (l2 / smooth).to(torch.bfloat16)
    layer.proj_up.data = up.to(torch.bfloat16)
    if lin.bias is not None:
        layer.bias.data = lin.bias.data
    layer.method.process_weights_after_loading(layer)
    return layer


def awq_layer(name: str, lin: torch.nn.Linear) -> QuantLinear:
    w = lin.weight.data.float()
    n, k = w.shape
    blocks = w.reshape(n, k // 64, 64)
    scales = (blocks.abs().amax(-1) / 7).clamp(min=1e-8)
    codes = (torch.round(blocks / scales[..., None]) + 7).clamp(0, 15).reshape(n, k)
    spec = LayerSpec(name, k, n, lin.bias is not None, torch.bfloat16)
    config = QuantConfig.make("svdquant", scheme="int4", layer_schemes={name: "awq-w4a16"})
    with torch.device("cuda"):
        layer = QuantLinear(spec, AwqPacked4Method(config, spec), dtype=torch.bfloat16)
    layer.qweight.data = nibbles_to_plain(codes)
    layer.wscales.data = scales.to(torch.bfloat16)
    layer.wzeros.data = (-7 * scales).to(torch.bfloat16)
    if lin.bias is not None:
        layer.bias.data = lin.bias.data
    layer.method.process_weights_after_loading(layer)
    return layer


def build(double: int, single: int):
    import diffusers

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = diffusers.FluxTransformer2DModel(
            num_layers=double, num_single_layers=single, guidance_embeds=True).to(torch.bfloat16).eval()
    return model  # diffusers' (PyTorch's) random init: uniform weights of about 1 / sqrt(K)


def quantize(model, method_cls=SvdqPacked4Method) -> tuple[int, int]:
    bytes16, bytes4 = 0, 0
    for blocks in ("transformer_blocks", "single_transformer_blocks"):
        for name, lin in list(model.named_modules()):
            if not (name.startswith(blocks + ".") and type(lin) is torch.nn.Linear):
                continue
            if blocks == "transformer_blocks" and name.startswith("single_"):
                continue
            bytes16 += lin.weight.numel() * 2 + (lin.bias.numel() * 2 if lin.bias is not None else 0)
            layer = awq_layer(name, lin) if name.endswith(MODULATION) else svdq_layer(name, lin, method_cls)
            bytes4 += layer.method.weight_bytes(layer)
            replace_module(model, name, layer)
    torch.cuda.empty_cache()
    return bytes16, bytes4


def inputs(img: int, txt: int):
    g = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    side = int(img ** 0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(img, 1), ids.float()], 1).cuda()
    return dict(hidden_states=r(1, img, 64), encoder_hidden_states=r(1, txt, 4096), pooled_projections=r(1, 768),
                timestep=torch.tensor([0.5], device="cuda"), img_ids=img_ids, txt_ids=torch.zeros(txt, 3, device="cuda"),
                guidance=torch.tensor([3.5], device="cuda"), return_dict=False)


def step_ms(model, kw, reps: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        for _ in range(3):
            out = model(**kw)[0]
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            out = model(**kw)[0]
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], out


def compile_blocks(model) -> None:
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            block.compile()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=2, help="double blocks (FLUX.1-dev has 19)")
    ap.add_argument("--single", type=int, default=4, help="single blocks (FLUX.1-dev has 38)")
    ap.add_argument("--image-tokens", type=int, default=4096)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA GPU"}))
        return 1
    kw = inputs(args.image_tokens, args.text_tokens)
    result = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "blocks": {"double": args.double, "single": args.single},
              "tokens": {"image": args.image_tokens, "text": args.text_tokens}, "rank": RANK, "step_ms": {}}
    bf16 = build(args.double, args.single)
    result["step_ms"]["bf16_eager"], ref = step_ms(bf16, kw, args.reps)
    quant = build(args.double, args.single)
    bytes16, bytes4 = quantize(quant)
    result["weight_bytes"] = {"bf16": bytes16, "svdq": bytes4, "ratio": bytes4 / bytes16}
    result["step_ms"]["svdq_eager"], out = step_ms(quant, kw, args.reps)
    result["cosine_vs_bf16"] = float(torch.nn.functional.cosine_similarity(
        out.float().flatten(), ref.float().flatten(), dim=0))
    w4a8 = build(args.double, args.single)
    quantize(w4a8, SvdqPacked4W4A8Method)
    result["step_ms"]["svdq_w4a8_eager"], out8 = step_ms(w4a8, kw, args.reps)
    result["cosine_w4a8_vs_bf16"] = float(torch.nn.functional.cosine_similarity(
        out8.float().flatten(), ref.float().flatten(), dim=0))
    if not args.no_compile:
        compile_blocks(bf16)
        compile_blocks(quant)
        compile_blocks(w4a8)
        result["step_ms"]["bf16_compiled"], _ = step_ms(bf16, kw, args.reps)
        result["step_ms"]["svdq_compiled"], out_c = step_ms(quant, kw, args.reps)
        result["step_ms"]["svdq_w4a8_compiled"], _ = step_ms(w4a8, kw, args.reps)
        result["cosine_compiled_vs_eager"] = float(torch.nn.functional.cosine_similarity(
            out_c.float().flatten(), out.float().flatten(), dim=0))
    ms = result["step_ms"]
    result["ratio"] = {f"{variant}_{mode}": ms[f"{variant}_{mode}"] / ms[f"bf16_{mode}"]
                       for variant in ("svdq", "svdq_w4a8") for mode in ("eager", "compiled")
                       if f"{variant}_{mode}" in ms}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
