"""``diffgen repack``: rewrite a checkpoint in the runtime layout the plugins load it into
(``diffgen.tools.repack``)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a transformer directory, a weights file or an index")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--weights-path", help="weights override for a transformer directory")
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt/.bin checkpoints (weights_only)")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..tools.repack import repack

    stats = repack(args.src, args.dst, weights_path=args.weights_path, allow_pickle=args.trust_pickle,
                   overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0
