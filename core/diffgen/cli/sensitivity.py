"""``diffgen sensitivity``: which quantized linears of the candidate cost it accuracy against the
16-bit reference, and which layer groups to keep 16-bit to reach --min-cosine
(``diffgen.tools.sensitivity``); exit status 1 when the candidate as given is below the gate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import check_writable, library_progress_bars
from .sides import RUN_FLAGS, SAMPLING_FLAGS, add_side_arguments, side_overrides, side_pipeline, side_sampling

EXTRA = True  # --<side>-<component>-path for any component
SIDES = ("reference", "candidate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("The reference runs the sampling once, recording the transformer's calls; those calls are then "
                "replayed with the candidate's quantized linears swapped into the reference one layer group at a "
                "time. The reference must be 16-bit (no --reference-quantization). Metric: cosine of the "
                "transformer's output against the reference's, the lowest over the replayed calls. The suggested "
                "groups are globs (a checkpoint's ignore list, DEFAULT_ONLINE_IGNORES) and the "
                "--quantization-ignored-layers patterns that select exactly them (containment, or those globs). Memory: the "
                "reference pipeline while it records, then the 16-bit transformer and the candidate's quantized "
                "linears together.")
    add_side_arguments(p, SIDES, {**SAMPLING_FLAGS, "device": RUN_FLAGS["device"], "dtype": RUN_FLAGS["dtype"]})
    p.add_argument("--min-cosine", type=float, default=0.99,
                   help="the gate: suggest the 16-bit layer groups that reach it, and exit 1 if the candidate as "
                        "given is below it (default 0.99)")
    p.add_argument("--calls", type=int, default=4,
                   help="replay this many transformer calls, spread over the trajectory (default 4; each "
                        "measurement runs the transformer this many times)")
    p.add_argument("--component", default="transformer",
                   help="the transformer component to rank (default: transformer)")
    p.add_argument("--top", type=int, default=20, help="rows of each table to print (the JSON has all)")


def side_transformer(config, component: str, platform, dtype):
    """One side's transformer alone, as diffusers builds it: no rewrites, so that both sides have
    diffusers' own linears under diffusers' own names and blocks that call each of them."""
    from ..loader import load_transformer

    path = config.component_paths.get(component) or (config.transformer_path if component == "transformer" else None)
    weights = config.component_weights_paths.get(component) or \
        (config.transformer_weights_path if component == "transformer" else None)
    if path is not None and weights is None and Path(path).is_file():  # a weights file: the weights only
        path, weights = None, path
    if path is None:
        path = f"{config.model_path}/{component}"
    return load_transformer(path, weights_path=weights, quantization=config.quantization,
                            quantization_ignored_layers=config.quantization_ignored_layers,
                            quant_backend=config.quant_backend, device=platform, dtype=dtype,
                            allow_pickle=config.allow_pickle, rewrites=False, enable_svdquant=config.enable_svdquant,
                            quantization_precision=config.quantization_precision,
                            quantization_rank=config.quantization_rank)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    import inspect as pyinspect
    from dataclasses import asdict

    import torch

    from ..errors import DiffgenError
    from ..platform import resolve
    from ..tools.compare import write_json
    from ..tools.sensitivity import capture_calls, format_report, quantized_modules, sensitivity, spread
    from ..tools.sides import describe_side, free_device_memory, sampling_call_arguments, versions

    overrides = side_overrides(extra, SIDES)
    if args.output_json:
        check_writable(Path(args.output_json).resolve().parent, "--output-json")
    if args.reference_quantization or args.reference_enable_svdquant:
        raise DiffgenError("diffgen sensitivity ranks the candidate's quantized layers against a 16-bit reference: "
                           "drop --reference-quantization / --reference-enable-svdquant")
    library_progress_bars(False)
    reference, candidate = side_pipeline(args, "reference", overrides), side_pipeline(args, "candidate", overrides)
    sampling = side_sampling(args, "reference")
    for side, config in (("reference", reference), ("candidate", candidate)):
        if getattr(config, "attention", None):  # the replays run diffusers' own blocks and attention
            raise DiffgenError(f"diffgen sensitivity ranks linear layers and runs diffusers' attention; drop "
                               f"--{side}-attention (compare the attention backends with diffgen compare)")
    platform, dtype = resolve(args.device, args.dtype or "auto")

    pipe = reference.load(platform, dtype)
    if not isinstance(getattr(pipe, args.component, None), torch.nn.Module):
        raise DiffgenError(f"the reference pipeline {type(pipe).__name__} has no component {args.component!r}")
    pipe.set_progress_bar_config(disable=True)
    kwargs = sampling_call_arguments(pipe, sampling, None)
    if "output_type" in pyinspect.signature(type(pipe).__call__).parameters:
        kwargs["output_type"] = "latent"  # the transformer's calls are all that is needed
    with torch.inference_mode():
        calls = capture_calls(getattr(pipe, args.component), lambda: pipe(**kwargs))
    pipeline_name = type(pipe).__name__
    pipe = None  # the text encoders, the VAE and the rewritten transformer are not needed any more
    free_device_memory()
    print(f"diffgen: recorded {len(calls)} transformer calls; replaying {min(len(calls), args.calls)}",
          file=sys.stderr)

    model = side_transformer(reference, args.component, platform, dtype)
    quantized = side_transformer(candidate, args.component, platform, dtype)
    candidates = quantized_modules(model, quantized)
    methods = {name: module.method.describe() for name, module in candidates.items()}
    quantized = None  # only the quantized linears are kept, referenced by ``candidates``
    free_device_memory()
    if not candidates:
        raise DiffgenError("the candidate quantizes none of the reference's linear layers: give it "
                           "--candidate-quantization or a quantized --candidate-transformer-path")
    result = sensitivity(model, candidates, spread(calls, args.calls), min_cosine=args.min_cosine,
                         method_names=methods)
    result.update(versions=versions(), device=platform.describe(), dtype=str(dtype).removeprefix("torch."),
                  pipeline=pipeline_name, component=args.component, calls_recorded=len(calls),
                  sampling=asdict(sampling),
                  reference={"source": describe_side(reference)}, candidate={"source": describe_side(candidate)})
    passed = result["all_quantized"]["cosine"] >= args.min_cosine
    result["gates"] = {"min_cosine": args.min_cosine, "passed": passed, "violations": [] if passed else [
        f"candidate cosine {result['all_quantized']['cosine']:.6f} is below --min-cosine {args.min_cosine}"]}
    if args.output_json:
        write_json(result, args.output_json)
    print(format_report(result, top=args.top))
    print("gates: passed" if passed else "gates: FAILED: " + "; ".join(result["gates"]["violations"]))
    return 0 if passed else 1
