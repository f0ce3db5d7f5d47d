"""``diffgen bench``: a baseline against a candidate that differ only in checkpoint or
quantization, timed stage by stage (``diffgen.tools.bench``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_parallel_flags, check_writable, library_progress_bars
from .sides import RUN_FLAGS, SAMPLING_FLAGS, add_side_arguments, side_overrides, side_pipeline, side_sampling, side_value

EXTRA = True  # --<side>-<component>-path for any component
SIDES = ("baseline", "candidate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Every sampling and run flag also comes as --baseline-X / --candidate-X, which bench "
                "refuses when the two differ. Also: --baseline-<component>-path / "
                "--candidate-<component>-path (and -weights-path) for any component.")
    add_side_arguments(p, SIDES, {**SAMPLING_FLAGS, **RUN_FLAGS}, per_side={**SAMPLING_FLAGS, **RUN_FLAGS})
    p.add_argument("--warmup-runs", type=int, default=1, help="unmeasured runs per side first (default: 1)")
    add_parallel_flags(p)
    p.add_argument("--runs", type=int, default=3, help="measured runs per side (default: 3)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..tools.bench import BenchConfig, bench, format_table
    from ..tools.compare import json_safe, write_json

    from ..parallel import rank, rank_device

    if args.num_gpus > 1:  # each process of a --num-gpus run drives the GPU of its local rank
        args.device = rank_device(args.device)
    overrides = side_overrides(extra, SIDES)
    if args.output_json:
        check_writable(Path(args.output_json).resolve().parent, "--output-json")
    library_progress_bars(False)
    configs = [BenchConfig(
        side_pipeline(args, side, overrides), side_sampling(args, side), device=side_value(args, side, "device"),
        dtype=side_value(args, side, "dtype", "auto"),
        dit_cpu_offload=side_value(args, side, "dit_cpu_offload", False),
        pipeline_cpu_offload=side_value(args, side, "pipeline_cpu_offload", False),
        dit_layerwise_offload=side_value(args, side, "dit_layerwise_offload", False),
        compile=side_value(args, side, "compile", False)) for side in SIDES]
    result = bench(*configs, warmup_runs=args.warmup_runs, runs=args.runs)
    if rank() == 0:  # of a --num-gpus run, only rank 0 writes and prints
        if args.output_json:
            write_json(result, args.output_json)
        print(json.dumps(json_safe(result), indent=2) if args.json else format_table(result))
    return 0
