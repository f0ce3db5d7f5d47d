"""The flags of ``compare`` and ``bench``: two sides (reference or baseline, and candidate) of one
pipeline, each with its own checkpoint and quantization flags.

Each flag in SIDE_PIPELINE_FLAGS comes as ``--<side>-<flag>`` (one side); the sampling flags (and
bench's run flags) come as ``--<flag>`` for both sides, and bench also takes ``--<side>-<flag>``
to refuse sides that differ in them. ``--<side>-<component>-path`` works for any component.
"""

from __future__ import annotations

import argparse
import sys

from .common import DTYPE_CHOICES, UsageError, component_overrides

SIDE_PIPELINE_FLAGS = {
    "model-path": dict(help="a different pipeline directory or repo ID (default: --model-path)"),
    "transformer-path": dict(help="replace the whole transformer component directory"),
    "transformer-weights-path": dict(help="replace only the transformer's weights"),
    "quantization": dict(help="online quantization, e.g. fp8 (default: none, the 16-bit model)"),
    "quantization-ignored-layers": dict(nargs="+", metavar="PATTERN", help="keep these layers 16-bit"),
    "quant-backend": dict(help="force a linear method, a plugin, or a kind (native, weight-only, reference)"),
    "enable-svdquant": dict(action="store_const", const=True, help="the weights are a Nunchaku SVDQuant checkpoint"),
    "quantization-precision": dict(metavar="{int4,nvfp4,fp4}", help="SVDQuant precision"),
    "quantization-rank": dict(type=int, help="SVDQuant low-rank branch rank"),
    "attention": dict(help="attention backend: sdpa (default) or one a plugin publishes, e.g. fp8"),
}
SAMPLING_FLAGS = {
    "prompt": dict(), "negative-prompt": dict(), "image-path": dict(), "height": dict(type=int),
    "width": dict(type=int), "num-frames": dict(type=int), "num-inference-steps": dict(type=int),
    "guidance-scale": dict(type=float), "seed": dict(type=int),
}
RUN_FLAGS = {"device": dict(), "dtype": dict(choices=DTYPE_CHOICES),
             "dit-cpu-offload": dict(action="store_const", const=True),
             "pipeline-cpu-offload": dict(action="store_const", const=True),
             "dit-layerwise-offload": dict(action="store_const", const=True),
             "compile": dict(action="store_const", const=True)}


def add_side_arguments(p: argparse.ArgumentParser, sides: tuple[str, str], shared: dict,
                       per_side: dict | None = None) -> None:
    """``--model-path``, the ``shared`` flags for both sides, and each side's pipeline flags (plus
    ``per_side``, hidden from --help, for flags that must agree between the sides)."""
    p.add_argument("--model-path", "--model-id", dest="model_path",
                   help="diffusers pipeline directory or Hugging Face repo ID of both sides (default: the embedded "
                        "tiny model); --model-id is the spelling of SGLang-Diffusion's compare tool")
    for flag, kwargs in shared.items():
        p.add_argument(f"--{flag}", **kwargs)
    for side in sides:
        group = p.add_argument_group(f"{side} (what this side loads; --model-path and 16-bit by default)")
        for flag, kwargs in SIDE_PIPELINE_FLAGS.items():
            group.add_argument(f"--{side}-{flag}", **kwargs)
        for flag, kwargs in (per_side or {}).items():
            group.add_argument(f"--{side}-{flag}", **{**kwargs, "help": argparse.SUPPRESS})
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt/.bin checkpoints (weights_only)")
    p.add_argument("--output-json", help="write the full result as JSON here")


def side_value(args: argparse.Namespace, side: str, dest: str, default=None):
    for value in (getattr(args, f"{side}_{dest}", None), getattr(args, dest, None)):
        if value is not None:
            return value
    return default


def side_overrides(extra: list[str], sides: tuple[str, ...]) -> dict[str, tuple[dict, dict]]:
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


def side_pipeline(args: argparse.Namespace, side: str, overrides: dict):
    from ..tools.sides import PipelineConfig

    model_path = side_value(args, side, "model_path")
    if model_path is None:  # as generate does: a new user can try compare and bench offline
        from ..tiny.pipelines import embedded_default_pipeline

        model_path = embedded_default_pipeline()
        if side == "reference" or side == "baseline":
            print(f"diffgen: no --model-path; using the embedded default model (tiny FLUX.1, random weights) "
                  f"at {model_path}", file=sys.stderr)
    paths, weights = overrides[side]
    config = PipelineConfig(
        model_path, transformer_path=getattr(args, f"{side}_transformer_path"),
        transformer_weights_path=getattr(args, f"{side}_transformer_weights_path"), component_paths=paths,
        component_weights_paths=weights, quantization=getattr(args, f"{side}_quantization"),
        quantization_ignored_layers=tuple(getattr(args, f"{side}_quantization_ignored_layers") or ()),
        quant_backend=getattr(args, f"{side}_quant_backend"), allow_pickle=args.trust_pickle,
        enable_svdquant=bool(getattr(args, f"{side}_enable_svdquant")),
        quantization_precision=getattr(args, f"{side}_quantization_precision"),
        quantization_rank=getattr(args, f"{side}_quantization_rank"),
        attention=getattr(args, f"{side}_attention"))
    if getattr(args, "num_gpus", 1) > 1:  # both sides run split the same way (diffgen.parallel)
        import dataclasses

        from ..parallel import parallel_config

        config = dataclasses.replace(config, parallel=parallel_config(args).resolved())
    return config


def side_sampling(args: argparse.Namespace, side: str):
    from ..run import SamplingArgs

    prompt = side_value(args, side, "prompt")
    if prompt is None:
        raise UsageError("--prompt is required")
    return SamplingArgs(prompt, *(side_value(args, side, d) for d in (
        "negative_prompt", "image_path", "height", "width", "num_frames", "num_inference_steps", "guidance_scale")),
        seed=side_value(args, side, "seed", 0))
