"""``diffgen compare``: a candidate's per-step latent similarity and output PSNR/SSIM against a
reference (``diffgen.tools.compare``); exit status 1 when a gate fails."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_parallel_flags, check_writable, library_progress_bars
from .sides import RUN_FLAGS, SAMPLING_FLAGS, add_side_arguments, side_overrides, side_pipeline, side_sampling

EXTRA = True  # --<side>-<component>-path for any component
SIDES = ("reference", "candidate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("The reference is the 16-bit model unless --reference-... flags say otherwise. Also: "
                "--reference-<component>-path / --candidate-<component>-path (and -weights-path) for "
                "any component, e.g. --candidate-transformer-2-path.")
    add_side_arguments(p, SIDES, {**SAMPLING_FLAGS, "device": RUN_FLAGS["device"], "dtype": RUN_FLAGS["dtype"]})
    add_parallel_flags(p)
    p.add_argument("--min-cosine", type=float, help="exit 1 if any step's latent cosine similarity is lower")
    p.add_argument("--min-psnr", type=float, help="exit 1 if the output's PSNR (dB; all frames of a video) is lower")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..tools.compare import compare, format_report, write_json

    from ..parallel import rank, rank_device

    if args.num_gpus > 1:  # each process of a --num-gpus run drives the GPU of its local rank
        args.device = rank_device(args.device)
    overrides = side_overrides(extra, SIDES)
    if args.output_json:
        check_writable(Path(args.output_json).resolve().parent, "--output-json")
    library_progress_bars(False)
    result = compare(side_pipeline(args, "reference", overrides), side_pipeline(args, "candidate", overrides),
                     side_sampling(args, "reference"), device=args.device, dtype=args.dtype or "auto",
                     min_cosine=args.min_cosine, min_psnr=args.min_psnr)
    if rank() == 0:  # of a --num-gpus run, only rank 0 writes and prints
        if args.output_json:
            write_json(result, args.output_json)
        print(format_report(result))
    return 0 if result["gates"]["passed"] else 1
