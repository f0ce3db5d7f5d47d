"""``diffgen quantize``: write a quantized checkpoint from a 16-bit transformer with one of the
quantizers the installed plugins publish (``diffgen.tools.quantize``)."""

from __future__ import annotations

import argparse
import json

from .common import add_ignore_flags, installed


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..plugins import QUANTIZERS

    names, p.epilog = installed(QUANTIZERS, "quantizers",
                                lambda q: f"; schemes: {', '.join(q.schemes)}): {q.summary}")
    p.add_argument("src", help="16-bit transformer directory (config.json + safetensors)")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--quantization", default="fp8",
                   help="an installed quantizer: " + (", ".join(names) or "none installed") + " (default: fp8)")
    p.add_argument("--scheme", help="one of the quantizer's schemes (default: its first)")
    add_ignore_flags(p)
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..tools.quantize import quantize

    stats = quantize(args.src, args.dst, quantization=args.quantization, scheme=args.scheme,
                     ignored_layers=args.quantization_ignored_layers,
                     quantize_all_layers=args.quantize_all_layers, overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0
