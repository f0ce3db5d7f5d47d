"""Offline quantizer: a 16-bit diffusers transformer directory -> an int8wo checkpoint.

Written to a temporary directory beside the destination, re-read and checked (detected as
int8wo; every tensor as written; every weight within half a quantization step of the source),
then renamed into place, so an interrupted run leaves nothing half-written. Usage::

    python -m diffgen_int8wo.quantize ./FLUX.1-dev/transformer ./flux-int8wo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffgen.checkpoint import open_checkpoint
from diffgen.checkpoint_writer import atomic_directory, refuse_existing
from diffgen.loader import build_meta_model
from diffgen.quant import QuantConfig, RepackTarget, default_online_ignore, linear_layers, matches_user_pattern

from . import plugin
from .format import QUANT_METHOD, dequantize_weight, quantization_config

SHARD_BYTES = 2 << 30
WEIGHTS = "diffusion_pytorch_model"


def _write(stream, out: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Write ``stream`` as shards of about SHARD_BYTES (diffusers names; an index when > 1)."""
    manifest: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    files, size = [], 0

    def flush() -> None:
        nonlocal size
        files.append(f"part-{len(files):05d}.safetensors")
        save_file(shards[-1], str(out / files[-1]), metadata={"format": "pt"})
        shards[-1], size = {}, 0

    weight_map = {}
    for name, tensor in stream:
        tensor = tensor.contiguous()
        shards[-1][name] = tensor
        manifest[name] = (tensor.dtype, tuple(tensor.shape))
        weight_map[name] = len(files)
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shards[-1] or not files:
        flush()
    if len(files) == 1:
        (out / files[0]).rename(out / f"{WEIGHTS}.safetensors")
        return manifest
    final = [f"{WEIGHTS}-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for old, new in zip(files, final):
        (out / old).rename(out / new)
    index = {"metadata": {}, "weight_map": {n: final[i] for n, i in weight_map.items()}}
    (out / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return manifest


def _verify(out: Path, source, manifest: dict) -> None:
    written = open_checkpoint(out)
    claim = plugin.detect_quant_config(written)
    if claim is None or claim.config.family != QUANT_METHOD or claim.unsupported_reason:
        raise RuntimeError(f"verification failed: {out} is not detected as an int8wo checkpoint")
    for name, (dtype, shape) in manifest.items():
        info = written.info(name)
        if info.dtype != dtype or tuple(info.shape) != shape:
            raise RuntimeError(f"verification failed: {name} was written as {dtype}{list(shape)} but reads "
                               f"back as {info.dtype}{list(info.shape)}")
        if name.endswith(".weight") and dtype == torch.int8:
            scale = written.read(name + "_scale")
            w = dequantize_weight(written.read(name), scale)
            # Round-to-nearest moves a weight by at most half a step; fp32 rounding of w / scale
            # and q * scale adds up to ~127 * 2^-23 of a step, well inside 1e-4.
            bound = scale.reshape(-1, 1) * (0.5 + 1e-4)
            if not bool(((w - source.read(name).float()).abs() <= bound).all()):
                raise RuntimeError(f"verification failed: {name} differs from the source by more than "
                                   "half a quantization step")


def quantize(src, dst, *, ignored_layers=(), overwrite: bool = False) -> dict:
    """Quantize the 16-bit transformer directory ``src`` into an int8wo checkpoint at ``dst``.

    ``ignored_layers``: dotted-boundary patterns (as ``--quantization-ignored-layers``) of layers
    to keep 16-bit, besides diffgen's precision-sensitive defaults for the model class.
    """
    dst = Path(dst)
    refuse_existing(dst, overwrite)
    source = open_checkpoint(src)
    if source.config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({source.config['quantization_config']!r}); "
                         "int8wo quantizes 16-bit checkpoints")
    model = build_meta_model(source)
    model_class = type(model).__name__
    linears = [spec.name for spec in linear_layers(model, torch.bfloat16)]
    kept = [n for n in linears if default_online_ignore(model_class, n)
            or any(matches_user_pattern(p, n) for p in ignored_layers)]
    config = QuantConfig.make(QUANT_METHOD, scheme="per-channel", ignore=tuple(kept))
    target = RepackTarget("checkpoint", model_class, dict(source.config), {}, tuple(linears))
    # Written to a temporary directory beside dst, checked, then renamed into place.
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        manifest = _write(plugin.repack_checkpoint(config, source.iter_tensors(), target), tmp)
        (tmp / "config.json").write_text(json.dumps({**source.config, "quantization_config":
                                                     quantization_config(kept)}, indent=2))
        _verify(tmp, source, manifest)
    return {"output": str(dst), "quantized_layers": len(linears) - len(kept), "kept_16bit_layers": len(kept),
            "tensors": len(manifest)}


def write_fixture(src: Path, dst: Path) -> None:
    """Conformance fixture writer (entry point group ``diffgen.fixtures``)."""
    quantize(src, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffgen_int8wo.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="16-bit transformer directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--quantization-ignored-layers", nargs="+", default=[], metavar="PATTERN")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    stats = quantize(args.src, args.dst, ignored_layers=args.quantization_ignored_layers, overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
