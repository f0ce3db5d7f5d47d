"""What several commands share: one-line errors, the quantization and device flags, component
path overrides, output checks, progress bars."""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from ..errors import DiffgenError

DTYPE_CHOICES = ["auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"]  # diffgen.platform.DTYPES


class UsageError(DiffgenError):
    """A contradiction or an impossible request in the command line."""


class Parser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; diffgen's errors are one line."""

    def error(self, message: str):
        self.exit(2, f"diffgen: error: {message} (see `{self.prog} --help`)\n")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", help="online quantization of a 16-bit checkpoint, e.g. fp8")
    add_ignore_flags(p)
    p.add_argument("--quant-backend", help="force a linear method, a plugin, or a kind (native, weight-only, reference) (see `diffgen inspect`)")
    add_svdquant_flags(p)
    add_device_flags(p)
    add_attention_flag(p)
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt/.bin checkpoints (weights_only)")


def add_attention_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default="sdpa", metavar="{sdpa,fp8,...}",
                   help="attention backend: sdpa (diffusers' own, default) or one a plugin publishes "
                        "(fp8: diffgen-cuda's INT8/FP8 Triton kernel, SM89+); an error where it cannot run")


def add_svdquant_flags(p: argparse.ArgumentParser) -> None:
    """SGLang-Diffusion's Nunchaku flags. They describe an SVDQuant checkpoint (detected anyway from
    svdq-{int4,fp4}_r{rank} file names and metadata); a flag that contradicts the file is an error."""
    p.add_argument("--enable-svdquant", action="store_true",
                   help="the transformer weights are a Nunchaku SVDQuant checkpoint (diffgen-nunchaku)")
    p.add_argument("--quantization-precision", metavar="{int4,nvfp4,fp4}",
                   help="SVDQuant precision (fp4 = nvfp4; checked with the request, diffgen.quant."
                        "SVDQUANT_PRECISIONS); implies --enable-svdquant")
    p.add_argument("--quantization-rank", type=int, metavar="N",
                   help="SVDQuant low-rank branch rank; implies --enable-svdquant")


def add_ignore_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization-ignored-layers", nargs="+", default=[], metavar="PATTERN",
                   help="keep 16-bit every layer whose name contains a pattern, as SGLang-Diffusion documents "
                        "('attn.to_' keeps to_q, to_k, to_v, to_out; end with '.' to stop at a block: 'blocks.3.')")
    p.add_argument("--quantize-all-layers", action="store_true",
                   help="online quantization also quantizes the layers diffgen keeps 16-bit by default "
                        "(embedders, final layer), as SGLang-Diffusion does")


def add_device_flags(p: argparse.ArgumentParser, dtype_default: str | None = "auto") -> None:
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: the first accelerator, else cpu)")
    p.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES,
                   help="compute dtype (auto: bf16 on accelerators, fp32 on the CPU)")


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """SGLang-Diffusion's parallel flags (diffgen.parallel.ParallelConfig checks them)."""
    g = p.add_argument_group("several GPUs (diffgen starts the workers itself; torchrun -m diffgen also works)")
    g.add_argument("--num-gpus", type=int, default=1, metavar="N",
                   help="processes to run on, one per GPU (--device cpu: gloo processes on the CPU)")
    g.add_argument("--sp-degree", type=int, metavar="N",
                   help="sequence parallel degree = ulysses x ring (default: what --num-gpus leaves after CFG and TP)")
    g.add_argument("--ulysses-degree", type=int, metavar="N",
                   help="Ulysses attention: processes that exchange whole heads (must divide the head count)")
    g.add_argument("--ring-degree", type=int, metavar="N",
                   help="Ring attention: processes that pass key/value slices around (needs a flash/cudnn backend)")
    g.add_argument("--cfg-parallel-size", type=int, default=1, choices=[1, 2],
                   help="2: the conditional and the unconditional branch on different processes")
    g.add_argument("--tp-size", type=int, default=1, metavar="N",
                   help="tensor parallel degree (FLUX.1, Wan; combines with --cfg-parallel-size, not with "
                        "--ulysses/--ring-degree)")


# Every spelling SGLang-Diffusion's docs use: --transformer-2-path, --transformer_2_path,
# --component-paths.transformer_2, --component_paths.transformer_2 (and the -weights- forms).
_COMPONENT_FLAG = re.compile(r"^--(?P<c>[a-z0-9][a-z0-9_-]*?)[-_](?P<kind>weights[-_]path|path)$")
_COMPONENT_MAP_FLAG = re.compile(r"^--component[-_](?P<kind>weights[-_]paths|paths)\.(?P<c>[a-z0-9][a-z0-9_-]*)$")


def component_overrides(extra: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Parse leftover ``--<component>-path X`` / ``--<component>-weights-path X`` pairs, in any of
    SGLang-Diffusion's spellings (``=`` or a separate value)."""
    paths: dict[str, str] = {}
    weights: dict[str, str] = {}
    tokens = list(extra)
    while tokens:
        token = tokens.pop(0)
        flag, _, value = token.partition("=")
        match = _COMPONENT_MAP_FLAG.match(flag) or _COMPONENT_FLAG.match(flag)
        if not match:
            raise UsageError(f"unrecognized argument {token!r}")
        if not value:
            if not tokens or tokens[0].startswith("--"):
                raise UsageError(f"{flag} needs a value")
            value = tokens.pop(0)
        component = match["c"].replace("-", "_")
        (weights if match["kind"].startswith("weights") else paths)[component] = value
    return paths, weights


def check_writable(directory: Path, flag: str) -> None:
    """Refuse an output directory that cannot be written before any work is done."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".diffgen-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {flag} {directory}: {exc.strerror or exc}") from exc


def library_progress_bars(enable: bool) -> None:
    """diffusers' and transformers' own bars (pipeline components, checkpoint shards)."""
    import diffusers
    import transformers

    for logging_module in (diffusers.utils.logging, transformers.utils.logging):
        (logging_module.enable_progress_bar if enable else logging_module.disable_progress_bar)()


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def installed(group: str, what: str, describe) -> tuple[list[str], str]:
    """The names the loaded plugins publish in ``group``, and an epilog listing them, one line each
    (``describe(obj)`` ends it; an object that fails to import is left out, and its plugin's
    failure is in `diffgen plugins`)."""
    from ..plugins import get_plugin_host

    host = get_plugin_host()
    extensions = host.extensions(group)
    lines = []
    for name, extension in sorted(extensions.items()):
        obj = host.load_extension(extension)
        if obj is not None:
            lines.append(f"{name} (plugin {extension.plugin}{describe(obj)}")
    head = f"Installed {what}:" if lines else f"Installed {what}: none (see `diffgen plugins`)"
    return sorted(extensions), "\n  ".join([head, *lines])
