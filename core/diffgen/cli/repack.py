"""``diffgen repack``: rewrite a checkpoint in the runtime layout the plugins load it into
(``diffgen.tools.repack``).

``diffgen repack NAME ...`` with NAME a converter an installed plugin publishes (group
``diffgen.converters``) and not an existing path runs that converter with the rest of the command
line, as ``diffgen convert NAME ...`` does (``diffgen repack wan --model-type ...``, the spelling
SGLang-Diffusion's users know from tools/wan_repack.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Parser, installed


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-path", help="weights override for a transformer directory")
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt/.bin checkpoints (weights_only)")
    p.add_argument("--overwrite", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..plugins import CONVERTERS

    _, listing = installed(CONVERTERS, "converters", lambda c: f"): {c.summary}")
    p.epilog = ("diffgen repack NAME [its flags] runs an installed converter (diffgen repack NAME --help).\n  "
                + listing)
    p.add_argument("src", help="a transformer directory, a weights file or an index; or a converter's NAME")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="dst",
                   help="output directory (written atomically); after a converter's NAME, its own flags")
    _add_flags(p)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..plugins import CONVERTERS, get_plugin_host
    from ..tools.convert import load_converter
    from ..tools.repack import repack

    host = get_plugin_host()
    if not Path(args.src).exists() and args.src in host.extensions(CONVERTERS):
        return load_converter(args.src, host).main(args.rest)
    tail = Parser(prog="diffgen repack SRC", allow_abbrev=False)
    tail.add_argument("dst", help="output directory (written atomically)")
    _add_flags(tail)
    more = tail.parse_args(args.rest)
    stats = repack(args.src, more.dst, weights_path=more.weights_path or args.weights_path,
                   allow_pickle=args.trust_pickle or more.trust_pickle, overwrite=args.overwrite or more.overwrite)
    print(json.dumps(stats, indent=2))
    return 0
