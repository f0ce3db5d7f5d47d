"""Online FP8 against BF16 on a whole Wan2.2 TI2V-5B-sized text-to-video pipeline at its published
default (1280x704, 121 frames): stage timings (diffgen.tools.bench) and trajectory similarity
(diffgen.tools.compare). Prints JSON; --out writes it. The video counterpart of
flux_compare_bench.py, whose loading and reporting it shares.

On one CUDA GPU (SM89+ for native FP8):
    python benchmarks/wan_compare_bench.py --out docs/benchmarks/wan_ti2v_fp8_vs_bf16_H100.json
On the CPU, to check that it assembles and runs (tiny sizes, fp32, FP8 reference method):
    python benchmarks/wan_compare_bench.py --tiny

What is real and what is not (the JSON repeats it under "setup"):
- transformer: WanTransformer3DModel with TI2V-5B's shape (30 blocks, 24 heads x 128, FFN 14336,
  48 latent channels, patch 1x2x2, per-token timesteps), random weights built on the GPU in bf16,
  streamed through diffgen's own load_transformer on both sides (the candidate quantizes online,
  as `--quantization fp8` does). At 1280x704 and 121 frames a step sees 31 x 22 x 40 = 27,280 tokens.
- VAE: AutoencoderKLWan with the Wan2.2 VAE's shape as recalled (residual, z 48, 16x spatial and
  4x temporal compression, patch 2; not checked against the published config: no network), random
  weights: the decode time is of that shape.
- text encoder: left out. Both sides get the same random prompt_embeds and negative_prompt_embeds
  [1, 512, 4096]; UMT5-XXL's time and memory are not in the numbers. Classifier-free guidance at
  TI2V-5B's default 5.0 runs the transformer twice per step, as the pipeline does.
- random weights make the video noise: the quality numbers say how much FP8 perturbs this
  network's trajectory, not how Wan2.2's videos change. Timings do not depend on weight values.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_compare_bench import arguments, environment, random_factory, run_parts  # noqa: E402

from diffgen.tools.sides import PipelineFactory  # noqa: E402

TI2V_5B = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
               text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
SCHEDULER = dict(num_train_timesteps=1000, shift=5.0)
TEXT_TOKENS = 512  # WanPipeline's max_sequence_length

# --tiny: the same assembly at sizes a CPU runs in seconds
TINY = dict(TI2V_5B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
            rope_max_seq_len=32)
TINY_VAE = dict(WAN22_VAE, base_dim=8, decoder_base_dim=None, dim_mult=[1, 2, 2], num_res_blocks=1,
                temperal_downsample=[True, True], scale_factor_spatial=8)


def wan_factory(args, quantization: str | None, label: str) -> PipelineFactory:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    config, vae_config = (TINY, TINY_VAE) if args.tiny else (TI2V_5B, WAN22_VAE)

    def assemble(transformer, vae):
        return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), expand_timesteps=True)

    return random_factory(args, quantization, label,
                          (WanTransformer3DModel, config, "tiny" if args.tiny else "TI2V-5B shape"),
                          (AutoencoderKLWan, vae_config, torch.float32), assemble)  # WanPipeline keeps its VAE fp32


def text_embeddings(args) -> dict:
    config = TINY if args.tiny else TI2V_5B
    generator = torch.Generator("cpu").manual_seed(args.seed + 2)
    tokens = 16 if args.tiny else TEXT_TOKENS
    embeds = [torch.randn(1, tokens, config["text_dim"], generator=generator).to(args.device, args.dtype)
              for _ in range(2)]
    return {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}


def main() -> None:
    def video_options(parser):
        parser.add_argument("--width", type=int, help="in px (default 1280; 64 with --tiny)")
        parser.add_argument("--frames", type=int, help="4k + 1 (default 121; 5 with --tiny)")

    args = arguments(__doc__.split("\n\n")[0], 5.0,  # TI2V-5B's default guidance
                     "height in px (default 704; 64 with --tiny)", video_options)
    size = dict(height=args.size or (64 if args.tiny else 704), width=args.width or (64 if args.tiny else 1280),
                num_frames=args.frames or (5 if args.tiny else 121))
    started = time.perf_counter()
    result: dict = {
        "benchmark": "benchmarks/wan_compare_bench.py", "command": [sys.executable, *sys.argv],
        "environment": environment(args),
        "setup": {
            "transformer": "WanTransformer3DModel, " + ("tiny config" if args.tiny else "Wan2.2 TI2V-5B shape (30 "
                           "blocks, 24 heads x 128, FFN 14336, 48 channels, patch 1x2x2, expand_timesteps)")
                           + ", random weights (torch default init, seeded), built on the device in "
                           + str(args.dtype).removeprefix("torch."),
            "loading": "both sides stream the same in-memory weights through diffgen.loader.load_transformer; the "
                       "candidate quantizes online (--quantization fp8, default 16-bit exclusions); "
                       "weights_fingerprint is the sum of the 16-bit weights",
            "vae": "AutoencoderKLWan, " + ("tiny config" if args.tiny else "Wan2.2 VAE shape as recalled (residual, "
                   "z 48, 16x spatial, 4x temporal)") + ", random weights, float32 as WanPipeline keeps it",
            "text_encoder": "left out: identical random prompt_embeds and negative_prompt_embeds [1, %d, %d] on both "
                            "sides; UMT5-XXL time and memory are not included"
                            % ((16, TINY["text_dim"]) if args.tiny else (TEXT_TOKENS, TI2V_5B["text_dim"])),
            "quality_caveat": "random weights: output videos are noise; cosine/PSNR/SSIM measure how FP8 perturbs "
                              "this network, not Wan2.2 video quality",
            **size, "guidance_scale": args.guidance_scale, "seed": args.seed,
            "bench": {"steps": args.bench_steps, "warmup_runs": args.warmup_runs, "runs": args.runs,
                      "compile": args.compile, "attention": "PyTorch SDPA through diffusers' default dispatch"},
            "compare": {"steps": args.compare_steps},
        },
    }
    baseline = wan_factory(args, None, "bf16" if args.dtype == torch.bfloat16 else "fp32")
    candidate = wan_factory(args, "fp8", "fp8 online")
    run_parts(args, result, baseline, candidate, text_embeddings(args), size, started)


if __name__ == "__main__":
    main()
