"""The ``compare`` and ``bench`` commands: two sides (reference/baseline and candidate) of one
pipeline, each with its own checkpoint and quantization flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import DTYPES, UsageError, _check_writable, _dtype, _library_progress_bars, component_overrides


# compare and bench run two sides. Each flag below comes as --<side>-<flag> (one side) and, for
# bench's run flags, also as --<flag> (both sides); --<side>-<component>-path works for any component.
_SIDE_PIPELINE_FLAGS = {
    "model-path": dict(help="a different pipeline directory (default: --model-path)"),
    "transformer-path": dict(help="replace the whole transformer component directory"),
    "transformer-weights-path": dict(help="replace only the transformer's weights"),
    "quantization": dict(help="online quantization, e.g. fp8 (default: none, the 16-bit model)"),
    "quantization-ignored-layers": dict(nargs="+", metavar="PATTERN", help="keep these layers 16-bit"),
    "quant-backend": dict(help="force one linear method or plugin"),
}
_SAMPLING_FLAGS = {
    "prompt": dict(), "negative-prompt": dict(), "image-path": dict(), "height": dict(type=int),
    "width": dict(type=int), "num-frames": dict(type=int), "num-inference-steps": dict(type=int),
    "guidance-scale": dict(type=float), "seed": dict(type=int),
}
_RUN_FLAGS = {"device": dict(), "dtype": dict(choices=["auto", *DTYPES]),
              "dit-cpu-offload": dict(action="store_const", const=True),
              "dit-layerwise-offload": dict(action="store_const", const=True),
              "compile": dict(action="store_const", const=True)}


def add_compare_and_bench(sub) -> None:
    c = sub.add_parser("compare", allow_abbrev=False,
                       help="per-step latent similarity and output PSNR/SSIM of a candidate against a reference",
                       epilog="The reference is the 16-bit model unless --reference-... flags say otherwise. Also: "
                              "--reference-<component>-path / --candidate-<component>-path (and -weights-path) for "
                              "any component, e.g. --candidate-transformer-2-path.")
    b = sub.add_parser("bench", allow_abbrev=False,
                       help="time a baseline against a candidate that differs only in checkpoint or quantization",
                       epilog="Every sampling and run flag also comes as --baseline-X / --candidate-X, which bench "
                              "refuses when the two differ. Also: --baseline-<component>-path / "
                              "--candidate-<component>-path (and -weights-path) for any component.")
    for p, sides in ((c, ("reference", "candidate")), (b, ("baseline", "candidate"))):
        p.add_argument("--model-path", help="diffusers pipeline directory of both sides")
        shared = {**_SAMPLING_FLAGS, **({"device": {}, "dtype": _RUN_FLAGS["dtype"]} if p is c else _RUN_FLAGS)}
        for flag, kwargs in shared.items():
            p.add_argument(f"--{flag}", **kwargs)
        for side in sides:
            group = p.add_argument_group(f"{side} (what this side loads; --model-path and 16-bit by default)")
            for flag, kwargs in _SIDE_PIPELINE_FLAGS.items():
                group.add_argument(f"--{side}-{flag}", **kwargs)
            if p is b:
                for flag, kwargs in {**_SAMPLING_FLAGS, **_RUN_FLAGS}.items():
                    group.add_argument(f"--{side}-{flag}", **{**kwargs, "help": argparse.SUPPRESS})
        p.add_argument("--trust-pickle", action="store_true", help="allow .pt/.bin checkpoints (weights_only)")
        p.add_argument("--output-json", help="write the full result as JSON here")
    c.add_argument("--min-cosine", type=float, help="exit 1 if any step's latent cosine similarity is lower")
    c.add_argument("--min-psnr", type=float, help="exit 1 if the output's PSNR (dB; all frames of a video) is lower")
    b.add_argument("--warmup-runs", type=int, default=1, help="unmeasured runs per side first (default: 1)")
    b.add_argument("--runs", type=int, default=3, help="measured runs per side (default: 3)")
    b.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def _side_value(args: argparse.Namespace, side: str, dest: str, default=None):
    for value in (getattr(args, f"{side}_{dest}", None), getattr(args, dest, None)):
        if value is not None:
            return value
    return default


def _side_overrides(extra: list[str], sides: tuple[str, ...]) -> dict[str, tuple[dict, dict]]:
    """``--<side>-<component>-path`` for one side, ``--<component>-path`` for both."""
    tokens: dict[str | None, list[str]] = {None: [], **{s: [] for s in sides}}
    rest = list(extra)
    while rest:
        token = rest.pop(0)
        side = next((s for s in sides if token.startswith(f"--{s}-")), None)
        tokens[side].append("--" + token[len(side) + 3:] if side else token)
        if "=" not in token and rest and not rest[0].startswith("--"):
            tokens[side].append(rest.pop(0))
    shared_paths, shared_weights = component_overrides(tokens[None])
    out = {}
    for side in sides:
        paths, weights = component_overrides(tokens[side])
        out[side] = ({**shared_paths, **paths}, {**shared_weights, **weights})
    return out


def _side_pipeline(args: argparse.Namespace, side: str, overrides: dict):
    from .tools.sides import PipelineConfig

    model_path = _side_value(args, side, "model_path")
    if model_path is None:
        raise UsageError(f"no pipeline for the {side}: pass --model-path (or --{side}-model-path)")
    paths, weights = overrides[side]
    return PipelineConfig(
        model_path, transformer_path=getattr(args, f"{side}_transformer_path"),
        transformer_weights_path=getattr(args, f"{side}_transformer_weights_path"), component_paths=paths,
        component_weights_paths=weights, quantization=getattr(args, f"{side}_quantization"),
        quantization_ignored_layers=tuple(getattr(args, f"{side}_quantization_ignored_layers") or ()),
        quant_backend=getattr(args, f"{side}_quant_backend"), allow_pickle=args.trust_pickle)


def _side_sampling(args: argparse.Namespace, side: str):
    from .generate import SamplingArgs

    prompt = _side_value(args, side, "prompt")
    if prompt is None:
        raise UsageError("--prompt is required")
    return SamplingArgs(prompt, *(_side_value(args, side, d) for d in (
        "negative_prompt", "image_path", "height", "width", "num_frames", "num_inference_steps", "guidance_scale")),
        seed=_side_value(args, side, "seed", 0))


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from .platform import detect_platform
    from .tools.compare import compare, format_report, write_json

    overrides = _side_overrides(extra, ("reference", "candidate"))
    if args.output_json:
        _check_writable(Path(args.output_json).resolve().parent)
    _library_progress_bars(False)
    platform = detect_platform(args.device)
    result = compare(_side_pipeline(args, "reference", overrides), _side_pipeline(args, "candidate", overrides),
                     _side_sampling(args, "reference"), device=platform.device,
                     dtype=_dtype(args.dtype or "auto", platform.device_kind),
                     min_cosine=args.min_cosine, min_psnr=args.min_psnr)
    if args.output_json:
        write_json(result, args.output_json)
    print(format_report(result))
    return 0 if result["gates"]["passed"] else 1


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from .platform import detect_platform
    from .tools.bench import BenchConfig, bench, format_table
    from .tools.compare import json_safe, write_json

    overrides = _side_overrides(extra, ("baseline", "candidate"))
    if args.output_json:
        _check_writable(Path(args.output_json).resolve().parent)
    _library_progress_bars(False)
    configs = []
    for side in ("baseline", "candidate"):
        device = _side_value(args, side, "device")
        configs.append(BenchConfig(
            _side_pipeline(args, side, overrides), _side_sampling(args, side), device=device,
            dtype=_dtype(_side_value(args, side, "dtype", "auto"), detect_platform(device).device_kind),
            dit_cpu_offload=_side_value(args, side, "dit_cpu_offload", False),
            dit_layerwise_offload=_side_value(args, side, "dit_layerwise_offload", False),
            compile=_side_value(args, side, "compile", False)))
    result = bench(*configs, warmup_runs=args.warmup_runs, runs=args.runs)
    if args.output_json:
        write_json(result, args.output_json)
    print(json.dumps(json_safe(result), indent=2) if args.json else format_table(result))
    return 0
