"""``diffgen convert NAME ...``: run one of the converters the installed plugins publish
(``diffgen.tools.convert``); ``diffgen convert NAME --help`` shows that converter's flags."""

from __future__ import annotations

import argparse

from .common import installed


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..plugins import CONVERTERS

    names, p.epilog = installed(CONVERTERS, "converters", lambda c: f"): {c.summary}")
    p.add_argument("converter", metavar="NAME",
                   help="an installed converter: " + (", ".join(names) or "none installed"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the converter's own flags")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..plugins import get_plugin_host
    from ..tools.convert import load_converter

    return load_converter(args.converter, get_plugin_host()).main(args.args)
