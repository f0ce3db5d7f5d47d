"""Which FP8 layer groups of FLUX.2-dev cost accuracy: per-group and per-layer sensitivity of a step.

Workload: Flux2Transformer2DModel with FLUX.2-dev's sizes (diffusers' defaults: hidden 6144 = 48
heads x 128, MLP ratio 3 (SwiGLU, 18432 wide), text width 15360, 128 latent channels, guidance
embeds), 2 of its 8 double-stream and 6 of its 48 single-stream blocks, random bf16 weights built
on the GPU (diffusers' own init, as benchmarks/family_step.py builds its models, or normal with
``--weight-std``), a 1024x1024 image (64 x 64 = 4096 latent tokens) and 512 text tokens, batch 1,
one forward per ``--timesteps`` value (default 0.5; the pipeline passes t / 1000), guidance 4.

FP8: every linear but diffgen's DEFAULT_ONLINE_IGNORES for Flux2Transformer2DModel, dynamic
per-token activations and per-channel weights with the method online ``--quantization fp8`` runs
on Hopper (``diffgen_cuda.fused.Fp8TritonMethod``), in diffusers' blocks (no rewrites). On a
machine without CUDA (``--device cpu --tiny``, a smoke test) the builtin reference method runs.
Measured by ``diffgen.tools.sensitivity`` against the bf16 model (cosine of the transformer
output): each layer's own error on the bf16 model's inputs, each layer group FP8 alone, everything
FP8, everything FP8 but one group (its "impact" is what keeping it bf16 buys), and the groups to
keep bf16, greedily by impact, until the cosine reaches ``--min-cosine``.

Random weights can mislead: real FLUX.2 weights and activations have outlier channels that random
ones lack, and outliers are what FP8's per-token and per-channel scales handle worst. Plant them
with ``--outlier-residual-channels N`` (N channels of the residual stream made ``--outlier-scale``
times larger, through the rows of x_embedder and context_embedder: the massive activations seen
in real DiTs, which every block's norm passes on to its linears) and ``--outlier-weight-columns N``
(N input columns of every quantized weight scaled up). FP8 (e4m3) is a float format: an outlier
costs the other values of its row or token precision only once they fall below its smallest normal
(2^-6, against 448 for the largest value: a ratio near 30,000), so outliers must be hundreds to
thousands of times the typical value to matter (tiny model on the CPU: weight columns x1000 take
the all-FP8 cosine from 0.99999 to 0.992; residual channels x1000 change nothing). A choice of
default 16-bit layers should hold with and without them, and is best confirmed with
``diffgen sensitivity`` on the real weights.

Prints JSON (and writes it with --out). Needs CUDA SM89+ and diffusers (or --device cpu --tiny).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda")]

from diffgen.builtin.fp8_methods import Fp8ReferenceMethod, quantize_weight  # noqa: E402
from diffgen.linear import QuantLinear  # noqa: E402
from diffgen.quant import LayerSpec, QuantConfig, default_online_ignore  # noqa: E402
from diffgen.tools.sensitivity import format_report, sensitivity  # noqa: E402

DEV = dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=6, attention_head_dim=128,
           num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
           axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)
TINY = dict(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64, timestep_guidance_channels=32,
            axes_dims_rope=(8, 8, 8, 8))
BLOCKS_OF_MODEL = {"double": 8, "single": 48}
GRID, TEXT_TOKENS = 64, 512  # 1024 px / 8 (VAE) / 2 (patchify) = 64; FLUX.2-dev's 512 text tokens
TINY_GRID, TINY_TEXT = 8, 16


def build(device: str, tiny: bool, seed: int, weight_std: float | None):
    from diffusers import Flux2Transformer2DModel

    config = dict(DEV, **(TINY if tiny else {}))
    torch.manual_seed(seed)
    with torch.device(device):
        model = Flux2Transformer2DModel(**config).to(torch.bfloat16).eval().requires_grad_(False)
        if weight_std is not None:  # diffusers zero-initialises some layers; give every matrix weights
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, weight_std)
    return model, config


def inputs(config: dict, device: str, tiny: bool, seed: int, timestep: float) -> dict:
    grid, text = (TINY_GRID, TINY_TEXT) if tiny else (GRID, TEXT_TOKENS)
    g = torch.Generator(device).manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], -1).reshape(1, -1, 4)
    txt_ids = torch.zeros(1, text, 4)
    txt_ids[..., 3] = torch.arange(text)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    return dict(hidden_states=torch.randn(1, grid * grid, config["in_channels"], generator=g, **bf16),
                encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g, **bf16),
                timestep=torch.full((1,), timestep, **bf16), guidance=torch.full((1,), 4.0, **bf16),
                img_ids=img_ids.float().to(device), txt_ids=txt_ids.to(device), return_dict=False)


def quantized_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and not default_online_ignore(type(model).__name__, n)}


def plant_outliers(model, linears: dict, residual_channels: int, weight_columns: int, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    planted = {}
    if residual_channels:
        width = model.x_embedder.out_features
        channels = torch.randperm(width, generator=g)[:residual_channels]
        for embedder in (model.x_embedder, model.context_embedder):
            embedder.weight.data[channels.to(embedder.weight.device)] *= scale
        planted["residual_channels"] = channels.tolist()
    if weight_columns:
        for lin in linears.values():
            columns = torch.randperm(lin.in_features, generator=g)[:weight_columns].to(lin.weight.device)
            lin.weight.data[:, columns] *= scale
        planted["weight_columns_per_layer"] = weight_columns
    return planted


def fp8_modules(linears: dict, method_cls, device: str) -> dict[str, QuantLinear]:
    """Each linear as an FP8 QuantLinear: per-channel weights, dynamic per-token activations."""
    config = QuantConfig.make("fp8", scheme="per-channel", params={"activation_scheme": "dynamic"})
    out = {}
    for name, lin in linears.items():
        spec = LayerSpec(name, lin.in_features, lin.out_features, lin.bias is not None, torch.bfloat16)
        with torch.device(device):
            layer = QuantLinear(spec, method_cls(config, spec), dtype=torch.bfloat16)
        for key, t in quantize_weight(lin.weight.data, "per-channel").items():
            getattr(layer, key).data = t.reshape(getattr(layer, key).shape)
        if lin.bias is not None:
            layer.bias.data = lin.bias.data
        layer.method.process_weights_after_loading(layer)
        out[name] = layer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="the gate the suggested 16-bit groups reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", type=float, nargs="+", default=[0.5],
                        help="one forward per timestep (t / 1000 as the pipeline passes it); metrics are the "
                             "worst over them (default 0.5)")
    parser.add_argument("--weight-std", type=float, default=None,
                        help="redraw every weight matrix from N(0, std) (default: diffusers' own init, as "
                             "benchmarks/family_step.py builds its models)")
    parser.add_argument("--outlier-residual-channels", type=int, default=0)
    parser.add_argument("--outlier-weight-columns", type=int, default=0)
    parser.add_argument("--outlier-scale", type=float, default=1000.0)
    parser.add_argument("--top", type=int, default=30, help="rows of each printed table")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    started = time.perf_counter()
    model, config = build(args.device, args.tiny, args.seed, args.weight_std)
    linears = quantized_linears(model)
    planted = plant_outliers(model, linears, args.outlier_residual_channels, args.outlier_weight_columns,
                             args.outlier_scale, args.seed)
    if args.device.startswith("cuda"):
        from diffgen_cuda.fused import Fp8TritonMethod as method_cls
    else:
        method_cls = Fp8ReferenceMethod
    candidates = fp8_modules(linears, method_cls, args.device)
    calls = [((), inputs(config, args.device, args.tiny, args.seed, t)) for t in args.timesteps]
    result = sensitivity(model, candidates, calls, min_cosine=args.min_cosine,
                         method_names={n: m.method.describe() for n, m in candidates.items()})
    grid = TINY_GRID if args.tiny else GRID
    report = {
        "benchmark": "sensitivity_flux2", "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else args.device, "torch": torch.__version__, "tiny": args.tiny, "config": config,
        "blocks": {"double": config["num_layers"], "single": config["num_single_layers"],
                   "of_model": BLOCKS_OF_MODEL},
        "timesteps": args.timesteps, "image_tokens": grid * grid, "text_tokens": TINY_TEXT if args.tiny else TEXT_TOKENS,
        "weight_init": "diffusers" if args.weight_std is None else f"normal(0, {args.weight_std})",
        "method": method_cls.name, "default_online_ignores_applied": True, "outliers": planted,
        "outlier_scale": args.outlier_scale if planted else None, "seconds": None, **result}
    report["seconds"] = time.perf_counter() - started
    print(format_report(result, top=args.top), file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
