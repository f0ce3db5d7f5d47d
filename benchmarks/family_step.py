"""One denoising step of a family other than FLUX.1: bf16 (diffusers) vs diffgen FP8 in diffusers'
blocks vs diffgen FP8 with diffgen-cuda's rewrites for that family vs torchao float8 rowwise on the
same layers, eager and compiled, side by side.

Families (``--family``), real widths with random bf16 weights built on the GPU, a stated subset of
the blocks (a full model's step is the subset's times the block ratio, plus embedders):
  qwen_image   Qwen-Image (and -Edit): 6 of 60 blocks, hidden 3072 (24 x 128), 1328x1328
               (83 x 83 = 6,889 image tokens) + 256 text tokens, batch 1.
  wan          Wan2.2 A14B (one expert): 2 of 40 blocks, hidden 5120 (40 x 128), FFN 13824, 1280x720
               and 81 frames (75,600 tokens) + 512 text tokens, batch 1.
  flux2        FLUX.2-dev: 2 of 8 double and 6 of 48 single blocks, hidden 6144 (48 x 128), MLP 18432
               (SwiGLU), 1024x1024 (64 x 64 = 4,096 image tokens) + 512 text tokens, batch 1, guidance 4.
  z_image      Z-Image (Turbo): the whole model (30 main layers and the 2 + 2 refiner layers, 6B
               parameters), dim 3840 (30 x 128), SwiGLU 10240, 1024x1024 (64 x 64 = 4,096 image
               tokens) + 256 caption tokens, batch 1. (A subset of 6 main layers understated the
               speed-up: the model's own work outside the blocks, ~3 ms of host-bound ops per step on
               an H200, weighed 3.4x more against the blocks than in the model.)
  hunyuan_video HunyuanVideo: 1 of 20 double and 1 of 40 single blocks, hidden 3072 (24 x 128), MLP
               12288, 1280x720 and 129 frames (33 latent frames x 45 x 80 = 118,800 tokens) + 256 text
               tokens, batch 1; attention is ~87% of its bf16 step. Use --iters 3 (a block runs ~0.3-0.7 s).
FP8: every linear but diffgen's DEFAULT_ONLINE_IGNORES, dynamic per-token activations and
per-channel weights (``Fp8TritonMethod``, what online ``--quantization fp8`` runs on Hopper).
"fused" = diffgen-cuda's rewrites for the family as load_transformer applies them (Qwen-Image:
``diffgen_cuda.qwen_image``: Q/K/V fused per stream, LayerNorm + modulation and GELU producers,
and a text mask that masks nothing dropped, as "bf16_rewritten" shows alone; Wan:
``diffgen_cuda.wan``, the attention projections fused and the feed-forward's GELU -> FP8
producer; FLUX.2: ``diffgen_cuda.flux2``, Q/K/V fused per stream in the double blocks, LayerNorm + modulation and SwiGLU (+ concat) producers, the FLUX.1
Q/K-norm + RoPE prologue kernel; Z-Image: ``diffgen_cuda.z_image``, Q/K/V and w1/w3 fused, w2 fed
by FLUX.2's SwiGLU producer; HunyuanVideo: ``diffgen_cuda.hunyuan_video``, Q/K/V fused per
stream, LayerNorm + modulation and GELU (+ concat) producers, attention on the real text keys
without the mask, as "bf16_rewritten" shows alone). The inputs carry
an all-ones text mask, as diffusers' pipelines pass it.
Compiled = regional torch.compile of each block. Attention: PyTorch SDPA through diffusers'
dispatch in every variant but ``fp8_fused_fp8_attention`` (``--fp8-attention [fp8|fp8-cudnn|fp8-fa3]``): the
FP8 fused model with its attention routed to diffgen-cuda's FP8 attention, as ``--attention`` does; the
JSON's ``fp8_attention`` counts the routed calls and the fallbacks (eager calls);
``sdpa_kernels`` gives, per variant, the PyTorch SDPA kernel (cudnn, flash, efficient, math) each
attention call of one eager step took, by PyTorch's own selection (issue 18: no variant may push
attention onto a slower kernel);
``--fp8-attention-config`` picks the Triton kernel's launch config (``fp8_attention_config``).
``--bf16-attention fa3`` adds ``bf16_fa3_attention``: the 16-bit model (with its 16-bit rewrites
where the family has any, then labelled ``bf16_rewritten_fa3_attention``) with its attention routed
to FlashAttention-3's exact bf16 kernel, what a 16-bit user gets with ``--attention fa3``.
torchao: ``torchao_float8_rowwise`` quantizes exactly the linears the FP8 variants quantize with
``quantize_(..., Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))`` (as
fp8_step.py does for FLUX.1) in diffusers' blocks, eager and compiled, on its own copy of the bf16
model and last (quantize_ changes Inductor's global settings); ``speedup_vs_torchao`` is torchao's
step time over each FP8 variant's in the same mode. When torchao is missing or fails, the JSON's
``torchao_float8_rowwise`` holds the error and the run goes on. ``--no-torchao`` leaves it out,
``--variants`` runs a subset (bf16 always runs). Quality at full size, per variant, of the one
step's output against the bf16 model's: ``cosine_vs_bf16`` and ``snr_db_vs_bf16`` (signal to error
power, the latent's PSNR: no VAE decodes here). ``--without-rewrites NAME ...`` leaves some of
the family's rewrites out, to measure what one of them buys against a run with it;
``--config num_layers=40`` (integer config entries) times more of the model than the stated
subset, the whole of it there (the embeddings and the output head, run once per step, weigh less
against 40 blocks than against 2); ``--warmup`` sets the untimed steps per variant and mode.

Prints JSON (and writes it with --out after every variant). Needs CUDA SM89+ and diffusers;
torchao for its variant.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda"), str(ROOT / "benchmarks")]

from diffgen.attention import install_attention  # noqa: E402
from diffgen.platform import resolve  # noqa: E402
from diffgen.rewrites import apply_rewrites, undo_rewrites  # noqa: E402
from diffgen_cuda.fused import Fp8TritonMethod  # noqa: E402
from fp8_step import calibrate, cosine, make_fp8, quantized_linears, swap, time_step, weight_bytes  # noqa: E402

def _randn(*shape, g):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)


def _qwen_inputs(config, size, g):
    grid, text = size
    return dict(hidden_states=_randn(1, grid * grid, config["in_channels"], g=g),
                encoder_hidden_states=_randn(1, text, config["joint_attention_dim"], g=g),
                encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long, device="cuda"),
                timestep=torch.full((1,), 0.5, device="cuda", dtype=torch.bfloat16),
                img_shapes=[[(1, grid, grid)]], return_dict=False), grid * grid, text


def _wan_inputs(config, size, g):
    frames, height, width, text = size  # latent frames and pixels / 8
    return dict(hidden_states=_randn(1, config["in_channels"], frames, height, width, g=g),
                encoder_hidden_states=_randn(1, text, config["text_dim"], g=g),
                timestep=torch.full((1,), 500.0, device="cuda", dtype=torch.bfloat16),
                return_dict=False), frames * (height // 2) * (width // 2), text


def _flux2_inputs(config, size, g):
    grid, text = size  # patches per side (pixels / 16), text tokens
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    img_ids = torch.zeros(grid * grid, 4)  # (t, h, w, l), as Flux2Pipeline builds them
    img_ids[:, 1], img_ids[:, 2] = rows.flatten(), cols.flatten()
    txt_ids = torch.zeros(text, 4)
    txt_ids[:, 3] = torch.arange(text)
    scalar = dict(device="cuda", dtype=torch.bfloat16)
    return dict(hidden_states=_randn(1, grid * grid, config["in_channels"], g=g),
                encoder_hidden_states=_randn(1, text, config["joint_attention_dim"], g=g),
                timestep=torch.full((1,), 0.5, **scalar), guidance=torch.full((1,), 4.0, **scalar),
                img_ids=img_ids[None].cuda(), txt_ids=txt_ids[None].cuda(), return_dict=False), grid * grid, text


def _z_image_inputs(config, size, g):
    grid, text = size  # latent pixels per side (pixels / 8), caption tokens
    return dict(x=[_randn(config["in_channels"], 1, grid, grid, g=g)],
                t=torch.full((1,), 0.5, device="cuda", dtype=torch.bfloat16),
                cap_feats=[_randn(text, config["cap_feat_dim"], g=g)], return_dict=False), (grid // 2) ** 2, text


def _hunyuan_video_inputs(config, size, g):
    frames, height, width, text = size  # latent frames and pixels / 8
    scalar = dict(device="cuda", dtype=torch.bfloat16)
    return dict(hidden_states=_randn(1, config["in_channels"], frames, height, width, g=g),
                timestep=torch.full((1,), 500.0, **scalar),
                encoder_hidden_states=_randn(1, text, config["text_embed_dim"], g=g),
                encoder_attention_mask=torch.ones(1, text, dtype=torch.long, device="cuda"),
                pooled_projections=_randn(1, config["pooled_projection_dim"], g=g),
                guidance=torch.full((1,), 6000.0, **scalar),  # the pipeline passes guidance * 1000
                return_dict=False), frames * (height // 2) * (width // 2), text


def _sample(out) -> torch.Tensor:
    """The model's output as one fp32 tensor (Z-Image returns a list of samples)."""
    out = out[0]
    return torch.stack(list(out)).float() if isinstance(out, (list, tuple)) else out.float()


FAMILIES = {
    "qwen_image": dict(
        cls="QwenImageTransformer2DModel", rewrites="diffgen_cuda.qwen_image", blocks="transformer_blocks",
        config=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                    axes_dims_rope=(16, 56, 56)),
        tiny=dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                  axes_dims_rope=(8, 12, 12)),
        blocks_of_model=60, inputs=_qwen_inputs, size=(83, 256), tiny_size=(8, 16)),
    # Wan2.2 A14B (each expert): 2 of 40 blocks, 1280x720 and 81 frames = 21 latent frames of
    # 90 x 160, patch (1, 2, 2): 75,600 tokens; 512 text tokens (UMT5)
    "wan": dict(
        cls="WanTransformer3DModel", rewrites="diffgen_cuda.wan", blocks="blocks",
        config=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=2,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        tiny=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=256),
        blocks_of_model=40, inputs=_wan_inputs, size=(21, 90, 160, 512), tiny_size=(2, 8, 8, 16)),
    # FLUX.2-dev: 2 of 8 double + 6 of 48 single blocks (the subset issue 18 measured); 1024x1024 is
    # 128 x 128 latents packed 2 x 2: 64 x 64 tokens of 128 channels; 512 text tokens (Mistral 3)
    "flux2": dict(
        cls="Flux2Transformer2DModel", rewrites="diffgen_cuda.flux2",
        blocks="transformer_blocks single_transformer_blocks",  # several lists: space-separated
        config=dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=6, attention_head_dim=128,
                    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True),
        tiny=dict(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                  joint_attention_dim=64, axes_dims_rope=(8, 8, 8, 8)),
        blocks_of_model=56, inputs=_flux2_inputs, size=(64, 512), tiny_size=(8, 16)),
    # Z-Image: all 30 main layers, and the 2 noise + 2 context refiner layers every step runs; 1024x1024
    # is 128 x 128 latents in 2 x 2 patches: 4,096 image tokens; 256 caption tokens (Qwen3 features)
    "z_image": dict(
        cls="ZImageTransformer2DModel", rewrites="diffgen_cuda.z_image",
        blocks="noise_refiner context_refiner layers",
        config=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                    n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                    rope_theta=256.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512]),
        tiny=dict(dim=96, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                  axes_dims=[16, 16, 16]),
        blocks_of_model=34, inputs=_z_image_inputs, size=(128, 256), tiny_size=(16, 16)),
    # HunyuanVideo (13B): 1 of 20 double + 1 of 40 single blocks; 1280x720 and 129 frames = 33 latent
    # frames of 90 x 160, patch (1, 2, 2): 118,800 tokens; 256 text tokens (the pipeline's max length)
    "hunyuan_video": dict(
        cls="HunyuanVideoTransformer3DModel", rewrites="diffgen_cuda.hunyuan_video",
        blocks="transformer_blocks single_transformer_blocks",
        config=dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=1,
                    num_single_layers=1, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                    rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
        tiny=dict(num_attention_heads=2, attention_head_dim=32, num_refiner_layers=1, text_embed_dim=64,
                  pooled_projection_dim=32, rope_axes_dim=(8, 12, 12)),
        blocks_of_model=60, inputs=_hunyuan_video_inputs, size=(33, 90, 160, 256), tiny_size=(2, 8, 8, 16)),
}


def build(family: str, tiny: bool, overrides: dict | None = None):
    import diffusers

    spec = FAMILIES[family]
    config = dict(spec["config"], **(spec["tiny"] if tiny else {}), **(overrides or {}))
    with torch.device("cuda"):
        model = getattr(diffusers, spec["cls"])(**config).to(torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    x, tokens, text = spec["inputs"](config, spec["tiny_size"] if tiny else spec["size"], g)
    return model, x, tokens, text


def set_compiled(model, on: bool, blocks: str):
    torch._dynamo.reset()
    for b in [b for name in blocks.split() for b in getattr(model, name)]:
        if on:
            b.compile()
        else:
            b._compiled_call_impl = None


OPTIONAL_VARIANTS = ("bf16_rewritten", "fp8_diffusers_blocks", "fp8_fused", "torchao")
FP8_VARIANTS = ("fp8_diffusers_blocks", "fp8_fused", "fp8_fused_fp8_attention")
TORCHAO = "torchao_float8_rowwise"


def torchao_float8_rowwise(model, names: set[str]) -> int:
    """Quantize the linears named ``names`` in place with torchao's float8 rowwise recipe (dynamic
    per-row FP8 activations, per-row FP8 weights, torch._scaled_mm): the layers diffgen's FP8
    variants quantize, so the two compare like for like. Returns how many linears it converted;
    raises whatever torchao raises (not installed, GPU below SM89, an API change)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, fqn: fqn in names)
    # torchao swaps the weight for its float8 tensor subclass and leaves the nn.Linear in place
    converted = {n for n, m in model.named_modules()
                 if n in names and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)}
    if converted != names:
        missing = sorted(names - converted)
        raise RuntimeError(f"torchao left {len(missing)} of {len(names)} linears unquantized, e.g. {missing[:3]}")
    return len(converted)


def speedups_vs_torchao(steps: dict[str, float]) -> dict[str, float]:
    """torchao's step time over each diffgen FP8 variant's, eager against eager and compiled against
    compiled (above 1: diffgen's variant is faster); empty when torchao has no time."""
    out = {}
    for mode in ("eager", "compiled"):
        tao = steps.get(f"{TORCHAO}_{mode}")
        for label in FP8_VARIANTS:
            if tao is not None and f"{label}_{mode}" in steps:
                out[f"{label}_{mode}"] = tao / steps[f"{label}_{mode}"]
    return out


def speedups_vs_bf16(steps: dict[str, float]) -> dict[str, float]:
    """bf16 (diffusers) step time over every other variant's, in the same mode."""
    out = {}
    for key, ms in steps.items():
        label, mode = key.rsplit("_", 1)
        if label != "bf16" and f"bf16_{mode}" in steps:
            out[key] = steps[f"bf16_{mode}"] / ms
    return out


def routed_attention(model, name: str, config: str | None, run) -> dict:
    """``run()`` with ``model``'s attention routed to the backend ``name`` (as ``--attention name``
    routes it; ``config``: the Triton kernel's launch config), then unrouted. Returns the calls
    routed and the fallbacks, with their reasons."""
    from diffgen.attention import remove_attention, resolve_attention_backend

    backend = resolve_attention_backend(name, resolve("cuda")[0])
    if config:
        backend.config = config
    stats = install_attention(model, backend)
    try:
        run()
    finally:
        remove_attention(model)
    return stats.to_dict()


def chosen_variants(variants: list[str] | None, no_torchao: bool) -> set[str]:
    """The optional variants to run (bf16 always runs: every ratio and cosine is against it)."""
    chosen = set(OPTIONAL_VARIANTS if variants is None else variants)
    return chosen - {"torchao"} if no_torchao else chosen


def snr_db(out: torch.Tensor, reference: torch.Tensor) -> float:
    """The step's output against the bf16 model's, as signal to error power in dB (a full-size
    model has no VAE here to decode with, so no image PSNR; this is the same measure on the latent)."""
    error = (out.double() - reference.double()).pow(2).sum().item()
    return math.inf if error == 0 else 10 * math.log10(reference.double().pow(2).sum().item() / error)


def config_override(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=INT, e.g. num_layers=40")
    return key, int(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen_image")
    parser.add_argument("--out")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each variant's timed ones")
    parser.add_argument("--fp8-attention", nargs="?", const="fp8", choices=["fp8", "fp8-cudnn", "fp8-fa3"],
                        help="also time FP8 fused with diffgen-cuda's FP8 attention: --attention fp8 (the "
                             "default), fp8-cudnn (cuDNN's FP8 kernel) or fp8-fa3 (FlashAttention-3's)")
    parser.add_argument("--bf16-attention", choices=["fa3"],
                        help="also time the 16-bit model with this exact attention backend (--attention fa3)")
    parser.add_argument("--fp8-attention-config", metavar="NAME",
                        help="the Triton FP8 kernel's launch config (diffgen_cuda.attention_fp8.launch_config)")
    parser.add_argument("--variants", nargs="+", choices=OPTIONAL_VARIANTS, metavar="VARIANT",
                        help="run only these besides bf16: " + ", ".join(OPTIONAL_VARIANTS) + " (default: all)")
    parser.add_argument("--no-torchao", action="store_true", help="leave out the torchao float8 rowwise variant")
    parser.add_argument("--config", nargs="+", default=[], metavar="KEY=INT", type=config_override,
                        help="override integer entries of the family's model config, e.g. num_layers=40 to "
                             "time every block of Wan2.2 A14B instead of the subset")
    parser.add_argument("--without-rewrites", nargs="+", default=[], metavar="NAME",
                        help="leave these of the family's rewrites out (what one rewrite buys, against a run without)")
    args = parser.parse_args()
    if args.fp8_attention_config:  # a bad name is refused now, not after the bf16 model has been timed
        from diffgen_cuda.attention_fp8 import launch_config

        try:
            launch_config(args.fp8_attention_config)
        except ValueError as exc:
            parser.error(str(exc))

    spec = FAMILIES[args.family]
    rewrites = importlib.import_module(spec["rewrites"]).REWRITES
    unknown = set(args.without_rewrites) - {r.name for r in rewrites}
    if unknown:
        parser.error(f"--without-rewrites: {sorted(unknown)} are not among {args.family}'s rewrites "
                     f"{sorted({r.name for r in rewrites})}")
    rewrites = [r for r in rewrites if r.name not in args.without_rewrites]
    overrides = dict(args.config)
    unknown = set(overrides) - set(spec["config"])
    if unknown:
        parser.error(f"--config: {sorted(unknown)} are not entries of {args.family}'s config {sorted(spec['config'])}")

    started = time.time()
    variants = chosen_variants(args.variants, args.no_torchao)
    torch.backends.cuda.matmul.allow_tf32 = False
    model, x, image_tokens, text_tokens = build(args.family, args.tiny, overrides)
    install_attention(model, None)  # SDPA as diffusers runs it, its kernel choices counted
    linears = quantized_linears(model)
    amax, shapes = calibrate(model, linears, x)
    with torch.no_grad():
        reference = _sample(model(**x))
    results = {"family": args.family, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "blocks_timed": sum(len(getattr(model, n)) for n in spec["blocks"].split()),
               "blocks_of_model": spec["blocks_of_model"], "config_overrides": overrides,
               "warmup": args.warmup, "iters": args.iters,
               "image_tokens": image_tokens, "text_tokens": text_tokens, "tiny": args.tiny,
               "variants_run": ["bf16", *sorted(variants)], "quantized_linears": len(linears),
               "gemm_shapes": [{"m": m, "k": k, "n": n, "count": c} for (m, k, n), c in sorted(shapes.items())],
               "steps_ms": {}, "cosine_vs_bf16": {}, "snr_db_vs_bf16": {}, "sdpa_kernels": {},
               "rewritten": {}}
    bf16_bytes = weight_bytes(model)
    modes = [False] if args.no_compile else [False, True]

    outputs = {}

    def save():  # after every variant, so a later failure or a timeout keeps what was measured
        steps = results["steps_ms"]
        results["speedup_vs_bf16"] = speedups_vs_bf16(steps)
        results["speedup_vs_torchao"] = speedups_vs_torchao(steps)
        results["wall_s"] = time.time() - started
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    def measure(net, label):
        try:
            for compiled in modes:
                set_compiled(net, compiled, spec["blocks"])
                times, _ = time_step(net, x, warmup=args.warmup, iters=args.iters)
                results["steps_ms"][f"{label}_{'compiled' if compiled else 'eager'}"] = statistics.median(times)
        finally:
            set_compiled(net, False, spec["blocks"])
        stats = net.diffgen_attention  # this last call is eager: count the SDPA kernel each attention call takes
        stats.sdpa_kernels.clear()
        with torch.no_grad():
            outputs[label] = _sample(net(**x))
        results["sdpa_kernels"][label] = dict(stats.sdpa_kernels)
        results["cosine_vs_bf16"][label] = cosine(outputs[label], reference)
        if label != "bf16":  # the reference itself: no error, no finite ratio
            results["snr_db_vs_bf16"][label] = snr_db(outputs[label], reference)
        save()

    measure(model, "bf16")
    # torchao quantizes nn.Linear weights in place, and the FP8 variants below replace and fuse the
    # linears of `model`: torchao gets its own copy of the bf16 model, parked on the host until its
    # turn. It runs last because quantize_ also changes Inductor's global settings.
    tao_model = copy.deepcopy(model).cpu() if "torchao" in variants else None
    results["without_rewrites"] = args.without_rewrites
    # 16-bit linears: only the rewrites that need no quantized linear apply (Qwen-Image: the text
    # mask that masks nothing is dropped, which keeps attention on cuDNN)
    if "bf16_rewritten" in variants or args.bf16_attention:
        results["rewritten_bf16"] = apply_rewrites(model, rewrites, resolve("cuda")[0])
        if results["rewritten_bf16"] and "bf16_rewritten" in variants:
            measure(model, "bf16_rewritten")
        if args.bf16_attention:
            label = f"bf16{'_rewritten' if results['rewritten_bf16'] else ''}_{args.bf16_attention}_attention"
            results["bf16_attention"] = routed_attention(model, args.bf16_attention, None, lambda: measure(model, label))
        undo_rewrites(model)
    if variants & {"fp8_diffusers_blocks", "fp8_fused"} or args.fp8_attention:
        swap(model, make_fp8(linears, Fp8TritonMethod, False, amax))
        results["weight_bytes_ratio"] = weight_bytes(model) / bf16_bytes
        if "fp8_diffusers_blocks" in variants:
            measure(model, "fp8_diffusers_blocks")
        if "fp8_fused" in variants or args.fp8_attention:
            done = apply_rewrites(model, rewrites, resolve("cuda")[0])
            results["rewritten"] = {name: rewrite for name, rewrite in done.items()}
        if "fp8_fused" in variants:
            measure(model, "fp8_fused")
        if {"fp8_fused", "fp8_diffusers_blocks"} <= set(outputs):
            # the rewrite changes the producers and the fusion, not the FP8 math: it must agree with
            # FP8 in diffusers' blocks far closer than either agrees with bf16
            results["cosine_fused_vs_diffusers_blocks_fp8"] = cosine(outputs["fp8_fused"],
                                                                     outputs["fp8_diffusers_blocks"])
        if args.fp8_attention:  # the same model, its attention routed as `--attention fp8` routes it
            results["fp8_attention_config"] = args.fp8_attention_config
            results["fp8_attention"] = routed_attention(model, args.fp8_attention, args.fp8_attention_config,
                                                        lambda: measure(model, "fp8_fused_fp8_attention"))
    if tao_model is not None:
        del model, linears  # the FP8 model's memory goes back before torchao's copy comes in
        gc.collect()
        torch.cuda.empty_cache()
        tao = results[TORCHAO] = {"config": "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())"}
        try:
            import torchao

            tao["version"] = torchao.__version__
            tao_model.cuda()
            tao["quantized_linears"] = torchao_float8_rowwise(tao_model, set(quantized_linears(tao_model)))
            measure(tao_model, TORCHAO)
        except Exception as exc:  # say why instead of dropping the peer silently
            tao["error"] = f"{type(exc).__name__}: {exc}"
            save()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
