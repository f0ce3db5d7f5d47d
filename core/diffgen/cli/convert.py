"""``diffgen convert NAME ...``: run one of the converters the installed plugins publish
(``diffgen.tools.convert``); ``diffgen convert NAME --help`` shows that converter's flags."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..plugins import CONVERTERS, get_plugin_host

    host = get_plugin_host()
    installed = host.extensions(CONVERTERS)
    lines = []
    for name, extension in sorted(installed.items()):
        converter = host.load_extension(extension)
        if converter is not None:
            lines.append(f"{name} (plugin {extension.plugin}): {converter.summary}")
    p.epilog = "\n  ".join(["Installed converters:" if lines else "Installed converters: none (see `diffgen plugins`)", *lines])
    p.add_argument("converter", metavar="NAME",
                   help="an installed converter: " + (", ".join(sorted(installed)) or "none installed"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the converter's own flags")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..plugins import get_plugin_host
    from ..tools.convert import load_converter

    return load_converter(args.converter, get_plugin_host()).main(args.args)
