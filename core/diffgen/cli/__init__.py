"""The ``diffgen`` command.

One module per command, each with ``add_arguments(parser)`` and ``run(args, extra) -> exit
status`` (``extra``: the ``--<component>-path`` flags of the commands that take them, ``EXTRA``);
``common`` holds what several share. Only the parser of the command being run is built, so
``diffgen --help`` imports no plugin, while ``diffgen quantize --help`` and ``diffgen convert
--help`` list what the installed plugins publish now. User errors (diffgen's, OSError, ValueError)
print one line and exit with status 2; any other exception is a bug, said in one line with exit
status 1 (``DIFFGEN_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import DiffgenError
from .common import Parser

COMMANDS = {
    "generate": "generate an image or video",
    "inspect": "what diffgen would load and how, without loading",
    "plugins": "installed plugins, what they publish, and what they can run here",
    "quantize": "write a quantized checkpoint from a 16-bit transformer (quantizers come from plugins)",
    "convert": "convert a foreign checkpoint (converters come from plugins)",
    "repack": "rewrite a checkpoint in the runtime layout the plugins load it into",
    "compare": "per-step latent similarity and output PSNR/SSIM of a candidate against a reference",
    "sensitivity": "which quantized layers cost accuracy, and which to keep 16-bit to reach a cosine gate",
    "bench": "time a baseline against a candidate that differs only in checkpoint or quantization",
}


def _version() -> str:
    from .. import __version__

    return __version__


class _Formatter(logging.Formatter):
    """``diffgen: fetching ...`` for progress lines, ``diffgen: warning: ...`` for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"diffgen: {level}{record.getMessage()}"


def _configure_logging(quiet: bool):
    """Log to stderr for this command; returns what undoes it, so that a caller of ``main`` in its
    own process (a notebook, a test run) gets its logging back as it was."""
    root, diffgen = logging.getLogger(), logging.getLogger("diffgen")
    saved = root.level, diffgen.level
    handler = None
    if not root.handlers:  # as logging.basicConfig: only where nothing is configured yet
        handler = logging.StreamHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
        root.setLevel(logging.ERROR if quiet else logging.WARNING)
    # diffgen's own progress lines (hub fetches) show unless --quiet; other libraries' stay at WARNING.
    diffgen.setLevel(logging.ERROR if quiet else logging.INFO)

    def restore() -> None:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(saved[0])
        diffgen.setLevel(saved[1])
    return restore


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = Parser(prog="diffgen", allow_abbrev=False, description="Quantized diffusion transformers on diffusers.")
    top.add_argument("--version", action="version", version=f"diffgen {_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    top.parse_args(argv[:1])  # --help, --version, and a missing or unknown command end here
    name = argv[0]
    command = importlib.import_module(f"{__name__}.{name}")
    parser = Parser(prog=f"diffgen {name}", allow_abbrev=False, description=COMMANDS[name],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        command.add_arguments(parser)  # quantize and convert list what the loaded plugins publish
        args, extra = parser.parse_known_args(argv[1:])
        if extra and not getattr(command, "EXTRA", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.command_line = ["diffgen", *argv]
        if getattr(args, "num_gpus", 1) == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
            args.num_gpus = int(os.environ["WORLD_SIZE"])  # `torchrun -m diffgen generate` without --num-gpus
        if getattr(args, "num_gpus", 1) > 1:  # diffgen.parallel: start the workers, unless this is one
            from ..parallel import launched, parallel_config
            from ..parallel.launch import launch

            parallel_config(args).resolved()  # degrees that do not fit are refused before any worker starts
            if not launched():
                return launch(main, argv, args.num_gpus)
            args.quiet = getattr(args, "quiet", False) or os.environ.get("RANK") != "0"
        restore_logging = _configure_logging(quiet=getattr(args, "quiet", False))
        try:
            return command.run(args, extra)
        finally:
            restore_logging()
    except BrokenPipeError:  # `diffgen inspect ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except (DiffgenError, OSError, ValueError) as exc:  # the input or the machine: the user's to fix
        if os.environ.get("DIFFGEN_DEBUG"):
            raise
        return _error(2, f"diffgen: error: {str(exc).strip() or type(exc).__name__}")
    except Exception as exc:  # anything else is diffgen's own fault: one line, and how to see more
        if os.environ.get("DIFFGEN_DEBUG"):
            raise
        text = str(exc).strip().splitlines()
        return _error(1, f"diffgen: internal error, a bug in diffgen or a plugin ({type(exc).__name__}: "
                         f"{text[0] if text else ''}); run again with DIFFGEN_DEBUG=1 for the traceback and report it")


def _error(status: int, line: str) -> int:
    """Say the one-line error, once per run: a worker of ``--num-gpus`` hands it to its launcher,
    and under torchrun only rank 0 prints (every rank meets the same input errors)."""
    from ..parallel.launch import report_error

    if not report_error(status, line) and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
