"""The ``diffgen`` command: generate, inspect, plugins, quantize, compare, bench.

Flags of ``generate`` follow SGLang-Diffusion's names. ``--<component>-path`` and
``--<component>-weights-path`` work for any component of the pipeline (``--transformer-2-path``).
User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .errors import DiffgenError

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


class UsageError(DiffgenError):
    """A contradiction or an impossible request in the command line."""


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; diffgen's errors are one line."""

    def error(self, message: str):
        self.exit(2, f"diffgen: error: {message} (see `{self.prog} --help`)\n")


def _dtype(name: str, device: str):
    import torch

    if name == "auto":  # bf16 on accelerators; fp32 on the CPU, where bf16 GEMMs are slow
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, DTYPES[name])


def _common_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", help="online quantization of a 16-bit checkpoint, e.g. fp8")
    p.add_argument("--quantization-ignored-layers", nargs="+", default=[], metavar="PATTERN",
                   help="keep these layers 16-bit (dotted-name boundaries: 'img_mod', 'proj_out')")
    p.add_argument("--quant-backend", help="force one linear method or plugin (see `diffgen inspect`)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: the first accelerator, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="compute dtype")
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt/.bin checkpoints (weights_only)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffgen", allow_abbrev=False,
                     description="Quantized diffusion transformers on diffusers.")
    parser.add_argument("--version", action="version", version=f"diffgen {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", allow_abbrev=False, help="generate an image or video",
                       epilog="Also: --<component>-path DIR and --<component>-weights-path PATH for any "
                              "component, e.g. --transformer-2-path, --vae-path.")
    g.add_argument("--model-path", help="diffusers pipeline directory (default: the embedded tiny model)")
    g.add_argument("--transformer-path", help="replace the whole transformer component directory")
    g.add_argument("--transformer-weights-path",
                   help="replace only the transformer's weights: a .safetensors file, a directory of shards or an index")
    _common_quant_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--image-path", help="input image for image-to-video or editing pipelines")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-frames", type=int)
    g.add_argument("--num-inference-steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-output", action=argparse.BooleanOptionalAction, default=True,
                   help="write the image (PNG) or video (MP4) (default: on)")
    g.add_argument("--output-path", default="outputs", help="directory for outputs (default: ./outputs)")
    g.add_argument("--output-file-name", help="file name without extension (default: from prompt and seed)")
    g.add_argument("--dit-cpu-offload", action="store_true", help="keep components on the CPU until used")
    g.add_argument("--dit-layerwise-offload", action="store_true",
                   help="stream the transformer's blocks to the device one at a time")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer(s)")
    g.add_argument("--perf-json", help="write stage timings, memory and methods as JSON here")
    g.add_argument("--quiet", action="store_true", help="no progress output")

    i = sub.add_parser("inspect", allow_abbrev=False, help="what diffgen would load and how, without loading")
    i.add_argument("path", help="a transformer directory, a pipeline directory, or a .safetensors file")
    i.add_argument("--weights-path", help="weights override for a transformer directory")
    _common_quant_flags(i)
    i.add_argument("--json", action="store_true")

    pl = sub.add_parser("plugins", allow_abbrev=False, help="installed plugins and what they can run here")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--all", action="store_true", help="include builtin plugins")
    pl.add_argument("--requirements", action="store_true", help="name==version lines of external plugins")
    pl.add_argument("--device")

    q = sub.add_parser("quantize", allow_abbrev=False, help="write an fp8 checkpoint from a 16-bit transformer")
    q.add_argument("src", help="16-bit transformer directory (config.json + safetensors)")
    q.add_argument("dst", help="output directory (written atomically)")
    q.add_argument("--quantization", default="fp8", choices=["fp8"])
    q.add_argument("--scheme", default="per-channel", choices=["per-channel", "per-tensor", "block"])
    q.add_argument("--quantization-ignored-layers", nargs="+", default=[], metavar="PATTERN")
    q.add_argument("--overwrite", action="store_true")
    cv = sub.add_parser("convert", allow_abbrev=False, help="convert a foreign checkpoint (formats come from plugins)",
                        epilog=f"Formats: {', '.join(f'{f} (from {d})' for f, (_, d, _) in CONVERTERS.items())}. "
                               "`diffgen convert FORMAT --help` shows its flags.")
    cv.add_argument("format", choices=sorted(CONVERTERS))
    cv.add_argument("args", nargs=argparse.REMAINDER, help="the converter's own flags")
    from .cli_tools import add_compare_and_bench

    add_compare_and_bench(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


_COMPONENT_FLAG = re.compile(r"^--([a-z0-9][a-z0-9-]*?)-(weights-path|path)$")


def component_overrides(extra: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Parse leftover ``--<component>-path X`` / ``--<component>-weights-path X`` pairs."""
    paths: dict[str, str] = {}
    weights: dict[str, str] = {}
    tokens = list(extra)
    while tokens:
        token = tokens.pop(0)
        flag, _, value = token.partition("=")
        match = _COMPONENT_FLAG.match(flag)
        if not match:
            raise UsageError(f"unrecognized argument {token!r}")
        if not value:
            if not tokens or tokens[0].startswith("--"):
                raise UsageError(f"{flag} needs a value")
            value = tokens.pop(0)
        component = match.group(1).replace("-", "_")
        (weights if match.group(2) == "weights-path" else paths)[component] = value
    return paths, weights


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".diffgen-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to --output-path {directory}: {exc.strerror or exc}") from exc


def _library_progress_bars(enable: bool) -> None:
    """diffusers' and transformers' own bars (pipeline components, checkpoint shards)."""
    import diffusers
    import transformers

    for logging_module in (diffusers.utils.logging, transformers.utils.logging):
        (logging_module.enable_progress_bar if enable else logging_module.disable_progress_bar)()


def cmd_generate(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    import torch

    from .generate import (SamplingArgs, StageTimer, apply_run_options, call_arguments, check_run_options,
                           default_file_name, fused_blocks, fused_projections, layer_methods, peak_host_bytes,
                           save_result, weight_bytes)
    from .pipeline import load_pipeline
    from .platform import detect_platform
    from .progress import ByteProgress, StepProgress

    paths, weights = component_overrides(extra)
    if args.save_output:
        _check_writable(Path(args.output_path))
    if args.perf_json:
        _check_writable(Path(args.perf_json).resolve().parent)
    platform = detect_platform(args.device)
    check_run_options(platform, dit_cpu_offload=args.dit_cpu_offload, dit_layerwise_offload=args.dit_layerwise_offload)
    # Bars only on a terminal, and not with --quiet; elsewhere diffgen prints plain lines.
    terminal = sys.stderr.isatty()
    _library_progress_bars(terminal and not args.quiet)
    model_path = args.model_path
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if model_path is None:
        from .testing.tiny_pipelines import embedded_default_pipeline

        model_path = embedded_default_pipeline()
        say(f"diffgen: no --model-path; using the embedded default model (tiny FLUX.1, random weights, "
            f"for trying diffgen offline) at {model_path}")
    dtype = _dtype(args.dtype, platform.device_kind)
    started = time.perf_counter()
    pipe = load_pipeline(
        model_path, transformer_path=args.transformer_path, transformer_weights_path=args.transformer_weights_path,
        component_paths=paths, component_weights_paths=weights, quantization=args.quantization,
        quantization_ignored_layers=args.quantization_ignored_layers, quant_backend=args.quant_backend,
        device=platform.device, dtype=dtype, allow_pickle=args.trust_pickle,
        progress=ByteProgress("loading weights", quiet=args.quiet))
    load_s = time.perf_counter() - started
    apply_run_options(pipe, platform, dit_cpu_offload=args.dit_cpu_offload,
                      dit_layerwise_offload=args.dit_layerwise_offload, compile=args.compile)
    pipe.set_progress_bar_config(disable=args.quiet or not terminal)
    timer = StageTimer(platform.device, on_step=None if args.quiet or terminal else StepProgress("denoising"))
    sampling = SamplingArgs(args.prompt, args.negative_prompt, args.image_path, args.height, args.width,
                            args.num_frames, args.num_inference_steps, args.guidance_scale, args.seed)
    if platform.device_kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_started = time.perf_counter()
    with torch.inference_mode(), timer.installed(pipe):
        result = pipe(**call_arguments(pipe, sampling, timer))
    total_s = time.perf_counter() - run_started
    output = None
    if args.save_output:
        stem = args.output_file_name or default_file_name(args.prompt, args.seed)
        output = save_result(result, Path(args.output_path), stem)
        say(f"diffgen: wrote {output} ({type(pipe).__name__} from {model_path}, seed {args.seed}, "
            f"{total_s:.1f} s)")
    if args.perf_json:
        perf = {
            "command": ["diffgen", *argv],
            "model_path": str(model_path), "pipeline": type(pipe).__name__, "output": str(output) if output else None,
            "device": platform.to_dict(), "dtype": str(dtype).removeprefix("torch."),
            "load_s": load_s, "total_s": total_s,
            "stages": {"text_encoding_s": timer.text_encoding_s, "denoising_steps_s": timer.steps(),
                       "vae_decode_s": timer.vae_decode_s},
            "peak_host_memory_bytes": peak_host_bytes(),
            "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if platform.device_kind == "cuda" else None,
            "weight_bytes": weight_bytes(pipe), "methods": layer_methods(pipe),
            "fused_projections": fused_projections(pipe), "fused_blocks": fused_blocks(pipe),
        }
        Path(args.perf_json).write_text(json.dumps(perf, indent=2))
        say(f"diffgen: wrote {args.perf_json}")
    return 0


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _inspect_targets(path: Path, weights: str | None) -> list[tuple[str, Path, str | None]]:
    from .pipeline import is_transformer_component, pipeline_components, read_model_index

    if (path / "model_index.json").is_file():
        components = pipeline_components(read_model_index(path))
        return [(n, path / n, weights if n == "transformer" else None)
                for n, e in components.items() if is_transformer_component(n, e)]
    return [(path.name, path, weights)]


def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect

    reports = {}
    for name, path, weights in _inspect_targets(Path(args.path), args.weights_path):
        platform_device = args.device
        reports[name] = inspect(path, weights_path=weights, quantization=args.quantization,
                                quantization_ignored_layers=args.quantization_ignored_layers,
                                quant_backend=args.quant_backend, device=platform_device,
                                dtype=_dtype(args.dtype, "cpu" if not platform_device else platform_device.split(":")[0]),
                                allow_pickle=args.trust_pickle)
    if args.json:
        print(json.dumps(reports, indent=2, default=str))
        return 0
    for name, r in reports.items():
        print(f"== {name}: {r['model_class']} from {r['source']}")
        print(f"platform: {r['platform']['device_kind']} {r['platform']['device_name']}")
        if not r["claims"]:
            print("claims: none (16-bit checkpoint)")
        for c in r["claims"]:
            won = "*" if r["winner"] and c["plugin"] == r["winner"]["plugin"] else " "
            print(f"claim {won} {c['plugin']} (specificity {c['specificity']}): {c['evidence']}")
        if r["winner"]:
            cfg = r["winner"]["config"]
            print(f"config: family={cfg['family']} scheme={cfg['scheme']} online={cfg['online']} "
                  f"params={cfg['params']}")
        rows = [[g["pattern"], g["layers"], g["action"], g["method"] or "16-bit", g["reason"]] for g in r["groups"]]
        _print_table(rows, ["layers", "n", "action", "method", "why"])
        wb = r["weight_bytes"]
        print(f"weights: {wb['16bit'] / 2**20:.2f} MiB in 16-bit -> {wb['planned'] / 2**20:.2f} MiB planned "
              f"({wb['planned'] / max(wb['16bit'], 1):.2f}x)")
        for f in r["plugin_failures"]:
            print(f"plugin failure: {f['plugin']} at {f['stage']}: {f['reason']}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .api import list_plugins

    info = list_plugins(args.device)
    plugins = [p for p in info["plugins"] if args.all or not p["builtin"]]
    if args.requirements:  # pip-readable on stdout (one line per distribution); failures on stderr
        pins = {f"{p['distribution']}=={p['version']}" for p in plugins if not p["builtin"] and p["distribution"]}
        for line in sorted(pins, key=str.lower):
            print(line)
        for f in info["failures"]:
            print(f"diffgen: plugin {f['plugin']} failed at {f['stage']}: {f['reason']}", file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps({**info, "plugins": plugins}, indent=2))
        return 0
    plat = info["platform"]
    print(f"platform: {plat['device_kind']} {plat['device_name']} (torch {plat['torch_version']})")
    if not plugins:
        print("no external plugins installed (--all shows the builtin ones)")
    for p in plugins:
        origin = "builtin" if p["builtin"] else f"{p['distribution']} {p['version']}"
        print(f"{p['name']} ({origin}, {p['module']}): hooks {', '.join(p['hooks'])}")
        for k in (p["platform"] or {}).get("kernels", []):
            state = "available" if k["available"] else "unavailable"
            print(f"    {k['name']}: {state}{': ' + k['reason'] if k['reason'] else ''}")
    for f in info["failures"]:
        print(f"FAILED {f['plugin']} at {f['stage']}: {f['reason']}")
    return 0


# convert FORMAT -> (module with main(argv), distribution, diffgen extra); imported only when used.
CONVERTERS = {"modelopt-fp8": ("diffgen_cuda.convert", "diffgen-cuda", "cuda")}


def cmd_convert(args: argparse.Namespace) -> int:
    import importlib

    module, distribution, extra = CONVERTERS[args.format]
    try:
        converter = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise UsageError(f"diffgen convert {args.format} comes with the {distribution} plugin, which is not "
                             f"installed: pip install diffgen[{extra}]") from exc
        raise
    return converter.main(args.args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .tools.quantize import quantize

    stats = quantize(args.src, args.dst, quantization=args.quantization, scheme=args.scheme,
                     ignored_layers=args.quantization_ignored_layers, overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli_tools

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(format="diffgen: %(levelname)s: %(message)s",
                        level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING)
    if extra and args.command not in ("generate", "compare", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"generate": lambda: cmd_generate(args, extra, argv), "inspect": lambda: cmd_inspect(args),
                "plugins": lambda: cmd_plugins(args), "quantize": lambda: cmd_quantize(args),
                "compare": lambda: cli_tools.cmd_compare(args, extra),
                "bench": lambda: cli_tools.cmd_bench(args, extra),
                "convert": lambda: cmd_convert(args)}
    try:
        return commands[args.command]()
    except BrokenPipeError:  # `diffgen inspect ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except (DiffgenError, FileNotFoundError, ValueError) as exc:
        message = str(exc).strip()
        print(f"diffgen: error: {message}", file=sys.stderr)
        if os.environ.get("DIFFGEN_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
