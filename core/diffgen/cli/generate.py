"""``diffgen generate``: load a pipeline, run it once, write the image or video (and perf.json).

Flags follow SGLang-Diffusion's names. ``--<component>-path`` and ``--<component>-weights-path``
work for any component of the pipeline (``--transformer-2-path``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import add_parallel_flags, add_quant_flags, check_writable, component_overrides, library_progress_bars

EXTRA = True  # --<component>-path / --<component>-weights-path for any component


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.epilog = ("Also: --<component>-path DIR and --<component>-weights-path PATH for any component, "
                "e.g. --transformer-2-path, --vae-path.")
    g.add_argument("--model-path", help="diffusers pipeline directory or Hugging Face repo ID (owner/name[@revision]; "
                                        "default: the embedded tiny model)")
    g.add_argument("--transformer-path", help="replace the whole transformer component (directory or repo ID)")
    g.add_argument("--transformer-weights-path", "--transformer-quantized-path", "--quantized-model-path",
                   dest="transformer_weights_path",
                   help="replace only the transformer's weights: a .safetensors file, a directory of shards, an index "
                        "or a repo ID; quantized weights are recognised from what they hold (the other two "
                        "spellings are SGLang-Diffusion's legacy names)")
    add_quant_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--image-path", help="input image for image-to-video or editing pipelines")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-frames", type=int)
    g.add_argument("--num-inference-steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-output", action=argparse.BooleanOptionalAction, default=True,
                   help="write the image (PNG) or video (MP4) (default: on)")
    g.add_argument("--output-path", default="outputs", help="directory for outputs (default: ./outputs)")
    g.add_argument("--output-file-name", help="file name without extension (default: from prompt and seed)")
    g.add_argument("--dit-cpu-offload", action="store_true",
                   help="keep the diffusion transformer(s) on the CPU except while they denoise")
    g.add_argument("--pipeline-cpu-offload", action="store_true",
                   help="keep every component on the CPU until used (diffusers' model offload)")
    g.add_argument("--dit-layerwise-offload", action="store_true",
                   help="stream the transformer's blocks to the device one at a time")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer(s)")
    g.add_argument("--no-check-weights", dest="check_weights", action="store_false",
                   help="skip the check that no loaded transformer tensor holds NaN or infinity")
    g.add_argument("--perf-json", help="write stage timings, memory and methods as JSON here")
    g.add_argument("--profile", metavar="DIR",
                   help="write a torch.profiler trace of the denoising steps to DIR (open it in Perfetto or "
                        "chrome://tracing) and print the kernels that took longest")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    add_parallel_flags(g)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from ..offload import check_offload
    from ..parallel import parallel_config, rank, rank_device
    from ..pipeline import load_pipeline
    from ..platform import resolve
    from ..progress import ByteProgress, StepProgress
    from ..report import attention_fallback_lines, default_kept_lines, peak_device_bytes, peak_host_bytes, pipeline_report
    from ..run import (SamplingArgs, StageTimer, StepProfiler, apply_run_options, call_arguments, default_file_name,
                       save_result)
    from ..tiny.pipelines import embedded_default_pipeline

    paths, weights = component_overrides(extra)
    if args.save_output:
        check_writable(Path(args.output_path), "--output-path")
    if args.perf_json:
        check_writable(Path(args.perf_json).resolve().parent, "--perf-json")
    if args.profile:
        check_writable(Path(args.profile), "--profile")
    parallel = parallel_config(args)
    first = rank() == 0  # only rank 0 of a --num-gpus run writes outputs and progress
    platform, dtype = resolve(rank_device(args.device) if parallel.enabled else args.device, args.dtype)
    offload = dict(dit_cpu_offload=args.dit_cpu_offload, pipeline_cpu_offload=args.pipeline_cpu_offload,
                   dit_layerwise_offload=args.dit_layerwise_offload)
    check_offload(platform, **offload)
    # Bars only on a terminal, and not with --quiet; elsewhere diffgen prints plain lines.
    terminal = sys.stderr.isatty()
    library_progress_bars(terminal and not args.quiet)
    model_path = args.model_path
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if model_path is None:
        model_path = embedded_default_pipeline()
        say(f"diffgen: no --model-path; using the embedded default model (tiny FLUX.1, random weights, "
            f"for trying diffgen offline) at {model_path}")
    if parallel.enabled:
        from ..parallel.sequence import check_image_tokens

        check_image_tokens(parallel, model_path, args.height, args.width, args.num_frames)
    started = time.perf_counter()
    pipe = load_pipeline(
        model_path, transformer_path=args.transformer_path, transformer_weights_path=args.transformer_weights_path,
        component_paths=paths, component_weights_paths=weights, quantization=args.quantization,
        quantization_ignored_layers=args.quantization_ignored_layers, quantize_all_layers=args.quantize_all_layers,
        quant_backend=args.quant_backend, enable_svdquant=args.enable_svdquant,
        quantization_precision=args.quantization_precision, quantization_rank=args.quantization_rank,
        device=platform, dtype=dtype, allow_pickle=args.trust_pickle, check_weights=args.check_weights,
        progress=ByteProgress("loading weights", quiet=args.quiet), parallel=parallel, attention=args.attention)
    load_s = time.perf_counter() - started
    for line in default_kept_lines(pipe):
        say(line)
    apply_run_options(pipe, platform, **offload, compile=args.compile)
    pipe.set_progress_bar_config(disable=args.quiet or not terminal)
    timer = StageTimer(platform.device, on_step=None if args.quiet or terminal else StepProgress("denoising"))
    sampling = SamplingArgs(args.prompt, args.negative_prompt, args.image_path, args.height, args.width,
                            args.num_frames, args.num_inference_steps, args.guidance_scale, args.seed)
    if platform.device_kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_started = time.perf_counter()
    profiler = StepProfiler(Path(args.profile), platform) if args.profile else None
    timer.profiler = profiler
    with torch.inference_mode(), timer.installed(pipe):
        result = pipe(**call_arguments(pipe, sampling, timer))
    if profiler:
        say(profiler.finish())
    total_s = time.perf_counter() - run_started
    for line in attention_fallback_lines(pipe):
        say(line)
    output = None
    if args.save_output and first:
        stem = args.output_file_name or default_file_name(args.prompt, args.seed)
        output = save_result(result, Path(args.output_path), stem)
        say(f"diffgen: wrote {output} ({type(pipe).__name__} from {model_path}, seed {args.seed}, "
            f"{total_s:.1f} s)")
    if args.perf_json and first:
        perf = {
            "command": args.command_line,
            "model_path": str(model_path), "pipeline": type(pipe).__name__, "output": str(output) if output else None,
            "device": platform.to_dict(), "dtype": str(dtype).removeprefix("torch."),
            "load_s": load_s, "total_s": total_s,
            "stages": {"text_encoding_s": timer.text_encoding_s, "denoising_steps_s": timer.steps(),
                       "vae_decode_s": timer.vae_decode_s},
            "peak_host_memory_bytes": peak_host_bytes(), "peak_device_memory_bytes": peak_device_bytes(platform),
            **pipeline_report(pipe),
            "parallel": parallel.resolved().__dict__ if parallel.enabled else None,
        }
        Path(args.perf_json).write_text(json.dumps(perf, indent=2))
        say(f"diffgen: wrote {args.perf_json}")
    return 0
