"""Quality of each quantized variant for every tiny model family: ``diffgen compare`` of the variant
against the 16-bit pipeline, per-step latent cosine and output PSNR.

For each family of diffgen.tiny (random weights, built at run time), the tiny pipeline is written to
a temporary directory; the same directory loaded unquantized is the reference, and every variant
runs with identical sampling: 32x32 px, 4 steps, 5 frames for videos, seed 0, the pipeline's default
guidance, a 32x32 input image for wan_i2v and qwen_image_edit. The runs and the metrics are
``diffgen compare``'s own (diffgen.tools.compare.run_side, diffgen.tools.metrics), but the
reference runs once per family, not once per variant. Each variant's JSON entry carries the
equivalent ``diffgen compare`` command, which reports the same numbers (tests/test_benchmarks_family.py).

Variants (those the CLI offers for a 16-bit checkpoint; ``--variants`` picks):
  fp8             online ``--quantization fp8``: E4M3 weights with a scale per output channel,
                  activations quantized per token at every call (diffgen's builtin plugin; on CUDA
                  SM89+ diffgen-cuda's Triton methods and the family's rewritten blocks).
  fp8_per_tensor  ``diffgen quantize --scheme per-tensor`` (one weight scale per tensor, activations
                  per token), loaded with ``--candidate-transformer-path`` (and
                  ``--candidate-transformer-2-path`` for the two-expert Wan pipelines).
  fp8_block       the same with ``--scheme block`` (128x128 weight blocks; not run by default: every
                  tiny linear fits one block, so it equals fp8_per_tensor here).
  mxfp8           online ``--quantization mxfp8`` (diffgen-ascend, W8A8_MXFP8: E4M3 with an E8M0
                  scale per 32; emulated off the NPU).
  mxfp4_npu       online ``--quantization mxfp4_npu`` (diffgen-ascend, W4A4_MXFP4_DUALSCALE).
  mxfp4           online ``--quantization mxfp4`` (diffgen-rocm, W4A4 MXFP4). It keeps linears with
                  fewer than 256 outputs 16-bit, which is every linear of most tiny models: an entry
                  that quantized nothing says so (and shows cosine 1, PSNR inf).
  attention_fp8   ``--candidate-attention fp8`` (diffgen-cuda's Triton FP8 attention) on 16-bit linears,
                  so the numbers are attention's alone; attention_fp8_cudnn the same with ``fp8-cudnn``,
                  attention_fp8_fa3 with ``fp8-fa3`` (FlashAttention-3's FP8 kernel, per-head scales).
                  The kernels take head dims 64 and 128, the tiny transformers have 16: use them with
                  ``--head-dim 64``, which rebuilds each transformer at head dim 64 (its rope axes
                  re-split to sum to it; Z-Image 3 heads of 64) before anything runs. The run sets
                  DIFFGEN_FP8_ATTENTION_MIN_KEYS=0, so the tiny sequences reach the kernels (the CLI
                  would hand calls under 8,192 keys to SDPA); the commands in the JSON say so.
                  attention_fp8_reference: ``fp8-reference``, attention_fp8's math in float32 PyTorch
                  (the GPU tests hold the kernel to it), so its quality is measured on any device.
There is no online NVFP4, and static FP8 activation scales need a calibrated (ModelOpt) checkpoint:
neither is offered by the CLI for a 16-bit pipeline.

JSON: per family and variant, ``per_step_cosine`` (the latents after each step), ``psnr_db`` and
``ssim`` of the 8-bit output (all frames of a video), the methods and rewrites the candidate ran,
or ``error``. PSNR of identical outputs is written "inf". ``--device cpu`` runs the reference methods
in fp32; ``--device cuda`` runs what the GPU runs, in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this checkout's code ahead of installed copies (the plugins' entry points still say which are installed)
sys.path[:0] = [str(ROOT / "core"), *(str(ROOT / "plugins" / f"diffgen-{name}")
                                      for name in ("cuda", "rocm", "ascend", "nunchaku"))]

from diffgen.platform import resolve  # noqa: E402
from diffgen.run import SamplingArgs  # noqa: E402
from diffgen.tiny.pipelines import build_tiny_pipeline  # noqa: E402
from diffgen.tools.compare import SideRun, json_safe, run_side  # noqa: E402
from diffgen.tools.metrics import image_metrics, tensor_metrics, video_metrics  # noqa: E402
from diffgen.tools.sides import PipelineConfig, versions  # noqa: E402

FAMILIES = ("flux1", "flux2", "qwen_image", "qwen_image_edit", "wan", "wan_i2v", "wan_ti2v", "z_image",
            "hunyuan_video")
VIDEO_FAMILIES = {"wan", "wan_i2v", "wan_ti2v", "hunyuan_video"}
IMAGE_INPUT_FAMILIES = {"wan_i2v", "qwen_image_edit"}
ONLINE = {"fp8": "fp8", "mxfp8": "mxfp8", "mxfp4_npu": "mxfp4_npu", "mxfp4": "mxfp4"}
OFFLINE = {"fp8_per_tensor": "per-tensor", "fp8_block": "block"}  # diffgen quantize --scheme
ATTENTION = {"attention_fp8": "fp8", "attention_fp8_cudnn": "fp8-cudnn",  # --candidate-attention
             "attention_fp8_fa3": "fp8-fa3", "attention_fp8_reference": "fp8-reference"}
MIN_KEYS_ENV = "DIFFGEN_FP8_ATTENTION_MIN_KEYS"
VARIANTS = (*ONLINE, *OFFLINE, *ATTENTION)
# --head-dim 64: what each tiny transformer's config changes (the rope axes must sum to the head dim)
HEAD_DIM_64 = {
    "FluxTransformer2DModel": dict(attention_head_dim=64, axes_dims_rope=[16, 24, 24]),
    "Flux2Transformer2DModel": dict(attention_head_dim=64, axes_dims_rope=[16, 16, 16, 16]),
    "QwenImageTransformer2DModel": dict(attention_head_dim=64, axes_dims_rope=[16, 24, 24]),
    "WanTransformer3DModel": dict(attention_head_dim=64),
    "HunyuanVideoTransformer3DModel": dict(attention_head_dim=64, rope_axes_dim=[16, 24, 24]),
    "ZImageTransformer2DModel": dict(dim=192, n_heads=3, n_kv_heads=3, axes_dims=[16, 24, 24]),
}
DEFAULT_VARIANTS = ("fp8", "fp8_per_tensor", "mxfp8", "mxfp4_npu", "mxfp4")
PROMPT = "a red fox in the snow"


def input_image(path: Path, size: int) -> Path:
    """An RGB image with structure in both directions (ramps), for image-to-video and editing."""
    import PIL.Image

    ramp = np.linspace(0, 255, size)
    pixels = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 96.0)], -1)
    PIL.Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def transformer_components(pipeline_dir: Path) -> list[str]:
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    return sorted(name for name, spec in index.items()
                  if name.startswith("transformer") and isinstance(spec, list) and spec[0] is not None)


def widen_heads(pipeline_dir: Path, seed: int = 0) -> None:
    """Rebuild each transformer component of the pipeline at head dim 64 (``HEAD_DIM_64``), random
    init under ``seed`` plus the component's index, in place."""
    import diffusers
    import torch

    for index, component in enumerate(transformer_components(pipeline_dir)):
        folder = pipeline_dir / component
        config = json.loads((folder / "config.json").read_text())
        config.update(HEAD_DIM_64[config["_class_name"]])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        for stale in folder.glob("*.safetensors*"):
            stale.unlink()
        model.save_pretrained(folder, safe_serialization=True)


def quantized_offline(pipeline_dir: Path, scheme: str, work: Path) -> dict[str, str]:
    """``diffgen quantize --scheme scheme`` of each transformer component: component -> its directory."""
    from diffgen.tools.quantize import quantize

    out = {}
    for component in transformer_components(pipeline_dir):
        target = work / f"{pipeline_dir.name}-{component}-{scheme}"
        if not target.is_dir():
            quantize(str(pipeline_dir / component), str(target), quantization="fp8", scheme=scheme)
        out[component] = str(target)
    return out


def candidate(variant: str, pipeline_dir: Path, work: Path) -> tuple[PipelineConfig, list[str]]:
    """The candidate side of ``variant`` and its ``diffgen compare`` flags."""
    if variant in ATTENTION:
        return PipelineConfig(str(pipeline_dir), attention=ATTENTION[variant]), ["--candidate-attention",
                                                                                ATTENTION[variant]]
    if variant in ONLINE:
        return (PipelineConfig(str(pipeline_dir), quantization=ONLINE[variant]),
                ["--candidate-quantization", ONLINE[variant]])
    paths = quantized_offline(pipeline_dir, OFFLINE[variant], work)
    others = {c: p for c, p in paths.items() if c != "transformer"}
    flags = ["--candidate-transformer-path", paths["transformer"]]
    for component, path in others.items():
        flags += [f"--candidate-{component.replace('_', '-')}-path", path]
    return PipelineConfig(str(pipeline_dir), transformer_path=paths["transformer"], component_paths=others), flags


def metrics(ref: SideRun, cand: SideRun) -> dict:
    """What ``compare`` reports of two runs, for the JSON: the latents' cosine after every step and
    the 8-bit output's PSNR and SSIM (all frames of a video), with diffgen.tools.metrics."""
    if len(ref.latents) != len(cand.latents) or ref.frames.shape != cand.frames.shape:
        raise RuntimeError(f"the runs differ: {len(ref.latents)} and {len(cand.latents)} steps, outputs "
                           f"{ref.frames.shape} and {cand.frames.shape}")
    output = (video_metrics(ref.frames, cand.frames)["all_frames"] if ref.video
              else image_metrics(ref.frames[0], cand.frames[0]))
    cosines = [tensor_metrics(a, b)["cosine_similarity"] for a, b in zip(ref.latents, cand.latents)]
    methods = {component: sorted(set(groups.values())) for component, groups in cand.info["methods"].items()}
    entry = {"per_step_cosine": cosines, "timesteps": cand.timesteps, "min_step_cosine": min(cosines),
             "psnr_db": output["psnr_db"], "ssim": output["ssim"], "output": "video" if ref.video else "image",
             "methods": methods, "rewrites": cand.info.get("rewrites"), "generation_s": cand.info["generation_s"]}
    if any(stats.get("backend") != "sdpa" for stats in cand.info.get("attention", {}).values()):
        entry["attention"] = cand.info["attention"]  # calls routed and fallbacks, per component
    if all(m == ["16-bit"] for m in methods.values()) and "attention" not in entry:  # (attention variants: by design)
        entry["note"] = "no linear was quantized: the plugin kept every layer of this tiny model 16-bit"
    return entry


def run_family(family: str, variants: list[str], args: argparse.Namespace, platform, dtype, work: Path) -> dict:
    """The 16-bit run once, then each variant's run against it (``compare`` would rerun the
    reference for every variant: the same numbers, since both sides use the same seed and noise,
    at twice the time; qwen_image_edit's VAE encodes a one-megapixel input image in every run)."""
    pipeline_dir = work / (family if args.head_dim is None else f"{family}-head-dim-{args.head_dim}")
    if not (pipeline_dir / "model_index.json").is_file():
        build_tiny_pipeline(family, pipeline_dir, seed=0)
        if args.head_dim is not None:
            widen_heads(pipeline_dir)
    image = str(work / "input.png") if family in IMAGE_INPUT_FAMILIES else None
    sampling = SamplingArgs(PROMPT, image_path=image, height=args.size, width=args.size,
                            num_frames=args.frames if family in VIDEO_FAMILIES else None,
                            num_inference_steps=args.steps, seed=0)
    cli = ["diffgen", "compare", "--model-path", str(pipeline_dir), "--prompt", PROMPT, "--seed", str(sampling.seed),
           "--height", str(sampling.height), "--width", str(sampling.width),
           "--num-inference-steps", str(sampling.num_inference_steps), "--device", platform.device_kind]
    if sampling.num_frames:
        cli += ["--num-frames", str(sampling.num_frames)]
    if image:
        cli += ["--image-path", image]
    reference = run_side(PipelineConfig(str(pipeline_dir)), sampling, platform=platform, dtype=dtype)
    out = {"reference_generation_s": reference.info["generation_s"]}
    for variant in variants:
        try:
            side, flags = candidate(variant, pipeline_dir, work)
            # the tiny sequences are far under the 8,192 keys the FP8 backends route: route them all,
            # for this run only (the process's environment is as it was afterwards)
            routed = {MIN_KEYS_ENV: "0"} if variant in ATTENTION else {}
            with patch.dict(os.environ, routed):
                out[variant] = metrics(reference, run_side(side, sampling, platform=platform, dtype=dtype))
            out[variant]["command"] = shlex.join(cli + flags)
            if variant in ATTENTION:
                out[variant]["command"] = f"{MIN_KEYS_ENV}=0 " + out[variant]["command"]
        except Exception as exc:  # one variant's failure (a plugin not installed) must not end the run
            out[variant] = {"error": f"{type(exc).__name__}: {exc}"}
        progress = {k: out[variant][k] for k in ("min_step_cosine", "psnr_db", "error") if k in out[variant]}
        print(json.dumps(json_safe({family: {variant: progress}})), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="compute dtype (default: fp32 on the CPU, bf16 on a GPU)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), metavar="FAMILY")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS), metavar="VARIANT",
                        help="of " + ", ".join(VARIANTS) + " (default: " + ", ".join(DEFAULT_VARIANTS) + ")")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="height and width in pixels")
    parser.add_argument("--frames", type=int, default=5, help="frames of the video families")
    parser.add_argument("--head-dim", type=int, choices=[64],
                        help="rebuild the tiny transformers at this head dim (the FP8 attention kernels need 64+)")
    parser.add_argument("--work-dir", help="keep the tiny pipelines and quantized transformers here, so the "
                                           "commands in the JSON can be rerun (default: a temporary directory)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from diffgen.cli.common import library_progress_bars

    library_progress_bars(False)
    started = time.time()
    platform, dtype = resolve(args.device, args.dtype)
    result = {"tool": "benchmarks/family_quality.py", "device": platform.describe(),
              "dtype": str(dtype).removeprefix("torch."), "versions": versions(),
              "sampling": {"prompt": PROMPT, "height": args.size, "width": args.size, "steps": args.steps,
                           "video_frames": args.frames, "seed": 0},
              "reference": "the same tiny pipeline, unquantized, in the compute dtype",
              "head_dim": args.head_dim or "the tiny models' own (16; Z-Image 48)",
              "variants": args.variants, "families": {}}
    with tempfile.TemporaryDirectory(prefix="diffgen-family-quality-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        input_image(work / "input.png", args.size)
        for family in args.families:
            result["families"][family] = run_family(family, args.variants, args, platform, dtype, work)
    result["table"] = {family: {variant: [v.get("min_step_cosine"), v.get("psnr_db")] if "error" not in v else "error"
                                for variant, v in entries.items() if isinstance(v, dict)}
                       for family, entries in result["families"].items()}
    result["wall_s"] = time.time() - started
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
