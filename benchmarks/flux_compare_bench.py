"""Online FP8 against BF16 on a FLUX.1-dev-sized transformer at 1024x1024: stage timings
(diffgen.tools.bench) and trajectory similarity (diffgen.tools.compare). Prints JSON; --out writes it.

On one CUDA GPU (SM89+ for native FP8):
    python benchmarks/flux_compare_bench.py --out docs/benchmarks/flux_fp8_vs_bf16_H200.json
On the CPU, to check that it assembles and runs (tiny sizes, fp32, FP8 reference method):
    python benchmarks/flux_compare_bench.py --tiny

What is real and what is not (the JSON repeats it under "setup"):
- transformer: FluxTransformer2DModel with FLUX.1-dev's config (19 double + 38 single blocks,
  24 heads x 128, joint_attention_dim 4096, pooled 768, guidance embeds; 11.9 B parameters), with
  random weights (torch's default init, seeded) built directly on the GPU in bf16. No checkpoint is
  written: both sides stream the same in-memory weights through diffgen's own load_transformer,
  the baseline keeping them 16-bit, the candidate quantizing them online exactly as
  `--quantization fp8` does (default 16-bit exclusions included). A fingerprint of the 16-bit
  weights, taken while they stream, shows both sides got the same ones.
- VAE: AutoencoderKL with FLUX.1-dev's config, random weights: decode time is the real one.
- text encoders: left out. Both sides get the same random prompt_embeds [1, 512, 4096] and
  pooled_prompt_embeds [1, 768], so text encoding costs ~0 here; T5-XXL's time (tens of ms on an
  H100) and memory (~9.5 GB) are not in the numbers. Neither side quantizes them.
- random weights make the images noise: the quality numbers say how much FP8 perturbs this
  network's trajectory, not how FLUX.1-dev's images change. Timings do not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import diffgen
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
    import diffgen

from diffgen.run import SamplingArgs
from diffgen.safetensors_header import TensorInfo
from diffgen.tools.bench import BenchConfig, bench, format_table
from diffgen.tools.compare import compare, format_report, json_safe
from diffgen.tools.sides import PipelineFactory

FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
FLUX1_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                     scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX1_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length for FLUX.1-dev

# --tiny: the same assembly at sizes a CPU runs in seconds (in_channels = 4 x 16 latent channels).
TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(FLUX1_DEV_VAE, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                mid_block_add_attention=False)


def built_random(cls, config: dict, device: str, dtype: torch.dtype, seed: int):
    """``cls(**config)`` with torch's default init, seeded, allocated on ``device`` in ``dtype``."""
    torch.manual_seed(seed)  # also seeds every CUDA device
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


class ModuleTensors:
    """What the loader reads from a checkpoint (config, tensor names/dtypes/shapes, a tensor stream),
    served from a module built in memory. The stream hands each tensor over and drops the module's
    reference to it, so the 16-bit weights are never held twice; it also fingerprints them."""

    FILE = Path("<memory>")

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.config = {**module.config, "_class_name": type(module).__name__}
        self.sidecars: dict = {}
        self.metadata: dict = {}
        self.files = [self.FILE]
        self.tensors = {name: TensorInfo(name, t.dtype, tuple(t.shape), self.FILE, 0, 0)
                        for name, t in module.state_dict().items()}
        self.fingerprint: float | None = None

    def names(self) -> list[str]:
        return list(self.tensors)

    def file_of(self, name: str) -> Path:
        return self.FILE

    def describe(self) -> str:
        return f"random {type(self.module).__name__} built in memory"

    def iter_tensors(self, names=None):
        total = torch.zeros((), dtype=torch.float64, device=next(iter(self.module.parameters())).device)
        for name in list(self.tensors):
            owner_name, _, leaf = name.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            tensor = owner._parameters.pop(leaf) if leaf in owner._parameters else owner._buffers.pop(leaf)
            total += tensor.detach().sum(dtype=torch.float64)
            yield name, tensor.detach()
        self.fingerprint = float(total)


def load_transformer_from_memory(module, quantization: str | None, device: str, dtype: torch.dtype):
    """diffgen.load_transformer itself, reading ``module``'s tensors instead of a checkpoint: the
    loader, the plan, online quantization and the methods are the ones `diffgen generate` runs."""
    source = ModuleTensors(module)
    model = diffgen.load_transformer(source, quantization=quantization, device=device, dtype=dtype)
    return model, source.fingerprint


def random_factory(args, quantization: str | None, label: str, transformer: tuple, vae: tuple,
                   assemble) -> PipelineFactory:
    """A side whose transformer (``(cls, config, what)``) is built with random weights and streamed
    through ``load_transformer_from_memory``, with a random VAE (``(cls, config, dtype)``);
    ``assemble(transformer, vae)`` makes the pipeline."""
    transformer_cls, transformer_config, what = transformer
    vae_cls, vae_config, vae_dtype = vae
    description = {"label": label, "transformer": f"{transformer_cls.__name__}, random weights ({what}), "
                   f"seed {args.seed}", "quantization": quantization or "none (16-bit)"}

    def build():
        started = time.perf_counter()
        weights = built_random(transformer_cls, transformer_config, args.device, args.dtype, args.seed)
        parameters = sum(p.numel() for p in weights.parameters())
        model, fingerprint = load_transformer_from_memory(weights, quantization, args.device, args.dtype)
        del weights
        decoder = built_random(vae_cls, vae_config, args.device, vae_dtype or args.dtype, args.seed + 1)
        description.update(transformer_parameters=parameters, weights_fingerprint=fingerprint,
                           build_s=time.perf_counter() - started)
        return assemble(model, decoder)

    return PipelineFactory(build, description)


def flux_factory(args, quantization: str | None, label: str) -> PipelineFactory:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    config, vae_config = (TINY, TINY_VAE) if args.tiny else (FLUX1_DEV, FLUX1_DEV_VAE)

    def assemble(transformer, vae):
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER), vae=vae,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=transformer)

    return random_factory(args, quantization, label,
                          (FluxTransformer2DModel, config, "tiny" if args.tiny else "FLUX.1-dev config"),
                          (AutoencoderKL, vae_config, None), assemble)


def text_embeddings(args) -> dict:
    config = TINY if args.tiny else FLUX1_DEV
    generator = torch.Generator("cpu").manual_seed(args.seed + 2)
    tokens = 16 if args.tiny else TEXT_TOKENS
    prompt = torch.randn(1, tokens, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    return {"prompt_embeds": prompt.to(args.device, args.dtype),
            "pooled_prompt_embeds": pooled.to(args.device, args.dtype)}


def environment(args) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "diffgen": diffgen.__version__}
    if args.device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                         "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                         "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()})
    return env


def headline(bench_result: dict | None, compare_result: dict | None) -> dict:
    out = {}
    if bench_result:
        base, cand = bench_result["baseline"], bench_result["candidate"]
        out.update(
            bf16_step_ms=base["stages"]["step_median_s"]["median"] * 1e3,
            fp8_step_ms=cand["stages"]["step_median_s"]["median"] * 1e3,
            step_speedup=bench_result["speedup"]["step_median_s"],
            total_speedup=bench_result["speedup"]["total_s"],
            vae_decode_ms=base["stages"]["vae_decode_s"]["median"] * 1e3,
            bf16_transformer_gib=base["transformer_weight_bytes"] / 2**30,
            fp8_transformer_gib=cand["transformer_weight_bytes"] / 2**30,
            bf16_peak_gib=(base["memory"]["peak_device_allocated_bytes"] or 0) / 2**30,
            fp8_peak_gib=(cand["memory"]["peak_device_allocated_bytes"] or 0) / 2**30,
            same_weights=base["source"].get("weights_fingerprint") == cand["source"].get("weights_fingerprint"))
    if compare_result:
        out.update(min_step_cosine=compare_result["summary"]["min_step_cosine"],
                   final_step_cosine=compare_result["summary"]["final_step_cosine"],
                   psnr_db=compare_result["summary"]["psnr_db"], ssim=compare_result["summary"]["ssim"])
    return out


def arguments(description: str, guidance_scale: float, size_help: str, extra=None) -> argparse.Namespace:
    """The options both pipeline benchmarks take, parsed and settled (device, dtype)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes on the CPU: checks the script, measures nothing")
    parser.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--size", type=int, help=size_help)
    parser.add_argument("--bench-steps", type=int, default=8)
    parser.add_argument("--compare-steps", type=int, default=4)
    parser.add_argument("--warmup-runs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=guidance_scale)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="bench both sides with the transformer torch.compile'd (as `diffgen generate --compile`); "
                             "the warm-up runs absorb compilation")
    parser.add_argument("--skip", choices=["bench", "compare"], help="leave one part out")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    # bf16 as deployed; fp32 on the CPU, where the FP8 reference method computes in fp32 anyway.
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.device == "cpu":
        # Random weights drive some fp32 activations (GELU tails) subnormal, which x86 computes ~100x
        # slower; FP8 activation quantization flushes them, so without this the CPU "speedup" is bogus.
        torch.set_flush_denormal(True)
    if args.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(args.device))  # so the memory counters read this GPU
    return args


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], 3.5,  # FLUX.1-dev's default guidance
                     "height = width in px (default 1024; 64 with --tiny)")
    args.size = args.size or (64 if args.tiny else 1024)
    started = time.perf_counter()
    result: dict = {
        "benchmark": "benchmarks/flux_compare_bench.py", "command": [sys.executable, *sys.argv],
        "environment": environment(args),
        "setup": {
            "transformer": "FluxTransformer2DModel, " + ("tiny config" if args.tiny else "FLUX.1-dev config (19 double "
                           "+ 38 single blocks, 24 heads x 128, joint_attention_dim 4096, pooled 768, guidance embeds)")
                           + ", random weights (torch default init, seeded), built on the device in "
                           + str(args.dtype).removeprefix("torch."),
            "loading": "both sides stream the same in-memory weights through diffgen.loader.load_transformer; the "
                       "candidate quantizes online (--quantization fp8: per-channel FP8 weights, per-token FP8 "
                       "activations, default 16-bit exclusions); weights_fingerprint is the sum of the 16-bit weights",
            "vae": "AutoencoderKL, " + ("tiny config" if args.tiny else "FLUX.1-dev config") + ", random weights",
            "text_encoders": "left out: identical random prompt_embeds [1, %d, %d] and pooled_prompt_embeds [1, %d] on "
                             "both sides; text encoding (T5-XXL + CLIP-L) time and memory are not included"
                             % ((16, TINY["joint_attention_dim"], TINY["pooled_projection_dim"]) if args.tiny else
                                (TEXT_TOKENS, FLUX1_DEV["joint_attention_dim"], FLUX1_DEV["pooled_projection_dim"])),
            "quality_caveat": "random weights: output images are noise; cosine/PSNR/SSIM measure how FP8 perturbs "
                              "this network, not FLUX.1-dev image quality",
            "size": [args.size, args.size], "guidance_scale": args.guidance_scale, "seed": args.seed,
            "bench": {"steps": args.bench_steps, "warmup_runs": args.warmup_runs, "runs": args.runs,
                      "compile": args.compile, "attention": "PyTorch SDPA through diffusers' default dispatch"},
            "compare": {"steps": args.compare_steps},
        },
    }
    baseline = flux_factory(args, None, "bf16" if args.dtype == torch.bfloat16 else "fp32")
    candidate = flux_factory(args, "fp8", "fp8 online")
    run_parts(args, result, baseline, candidate, text_embeddings(args), dict(height=args.size, width=args.size),
              started)


def run_parts(args, result: dict, baseline: PipelineFactory, candidate: PipelineFactory, embeddings: dict,
              size: dict, started: float) -> None:
    """``diffgen bench`` then ``diffgen compare`` of the two sides (``args.skip`` leaves one out),
    with ``embeddings`` given to every pipeline call; the JSON is printed, and written to
    ``args.out`` after each part, so that a crash later keeps what ran."""
    def save() -> str:
        result["wall_s"] = time.perf_counter() - started
        text = json.dumps(json_safe(result), indent=2, allow_nan=False)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        return text

    def sampling(steps: int) -> SamplingArgs:
        return SamplingArgs("(prompt_embeds given)", seed=args.seed, num_inference_steps=steps,
                            guidance_scale=args.guidance_scale, **size)

    bench_result = compare_result = None
    if args.skip != "bench":
        configs = [BenchConfig(side, sampling(args.bench_steps), device=args.device, dtype=args.dtype,
                               compile=args.compile, label=side.description["label"]) for side in (baseline, candidate)]
        bench_result = bench(*configs, warmup_runs=args.warmup_runs, runs=args.runs, call_kwargs=embeddings)
        result["bench"] = bench_result
        save()
        print(format_table(bench_result), file=sys.stderr)
    if args.skip != "compare":
        compare_result = compare(baseline, candidate, sampling(args.compare_steps), device=args.device,
                                 dtype=args.dtype, call_kwargs=embeddings)
        result["compare"] = compare_result
        print(format_report(compare_result), file=sys.stderr)
    result["summary"] = headline(bench_result, compare_result)
    print(save())


if __name__ == "__main__":
    main()
