"""``diffgen convert NAME``: converters of foreign checkpoints, as installed plugins publish them.

A plugin publishes a :class:`Converter` in the entry-point group ``diffgen.converters``; the entry
point's name is what follows ``diffgen convert``. The core lists and runs them and knows none by
name. A converter writes like every diffgen tool (``diffgen.checkpoint_writer``): to a temporary
directory, re-read and checked, then renamed into place. This module never imports the generation
pipeline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from ..errors import DiffgenError
from ..plugins import CONVERTERS, PluginHost


@dataclass(frozen=True)
class Converter:
    """``summary``: one line for ``diffgen convert --help``. ``main(argv)``: the converter's own
    command line (what follows ``diffgen convert NAME``; ``--help`` shows its flags) -> exit status."""

    summary: str
    main: Callable[[list[str]], int]

    def run_as_script(self, prog: str) -> None:
        """The ``python -m`` entry of a converter module: its exit status; a DiffgenError is one
        line and status 2, as under ``diffgen convert``."""
        try:
            sys.exit(self.main(sys.argv[1:]))
        except DiffgenError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.exit(2)


def load_converter(name: str, host: PluginHost) -> Converter:
    installed = host.extensions(CONVERTERS)
    if name not in installed:
        failed = [f"{f.plugin} ({f.reason})" for f in host.failures]
        raise DiffgenError(f"no installed plugin publishes a converter named {name!r} (installed: "
                           f"{', '.join(sorted(installed)) or 'none'}"
                           + (f"; plugins that failed to load: {', '.join(failed)}" if failed else "")
                           + "); see `diffgen convert --help`")
    converter = host.load_extension(installed[name])
    if not isinstance(converter, Converter):
        raise DiffgenError(f"plugin {installed[name].plugin} publishes converter {name!r} as "
                           f"{type(converter).__name__}, not a diffgen.tools.convert.Converter")
    return converter
