"""``diffgen.quantize``: write an FP8 checkpoint from a 16-bit diffusers transformer.

The output is written to a temporary directory beside the destination, re-read and checked
(detected as fp8, every tensor as written, every weight within FP8 rounding of the original),
and only then renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..builtin import fp8 as fp8_plugin
from ..checkpoint import open_checkpoint
from ..checkpoint_writer import atomic_directory, check_manifest, finish_layout, refuse_existing, write_shards
from ..errors import DiffgenError
from ..loader import build_meta_model, resolve_claim
from ..numerics.fp8 import dequantize_fp8, dequantize_fp8_block
from ..plugins import get_plugin_host
from ..quant import (QuantConfig, QuantRequest, RepackTarget, default_online_ignore, linear_layers,
                     matches_user_pattern)

SHARD_BYTES = 4 << 30
# e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself; values
# near the bottom of the range (subnormals) carry an absolute error of at most scale * 2^-10.
_REL_TOL = 2.0 ** -4


def _verify(out: Path, src, manifest: dict, scheme: str) -> None:
    written = open_checkpoint(out)
    _, claim = resolve_claim(written, None, get_plugin_host())
    if claim is None or claim.config.family != "fp8" or claim.config.scheme != scheme:
        raise DiffgenError(f"verification failed: {out} is not detected as an fp8 {scheme} checkpoint")
    check_manifest(written, manifest)
    for name in manifest:
        prefix = name[: -len(".weight")]
        if not name.endswith(".weight") or written.info(name).dtype != torch.float8_e4m3fn:
            continue
        q = written.read(name)
        if scheme == "block":
            w = dequantize_fp8_block(q, written.read(f"{prefix}.weight_scale_inv"))
            scale = written.read(f"{prefix}.weight_scale_inv").max()
        else:
            scale = written.read(f"{prefix}.weight_scale")
            w = dequantize_fp8(q, scale.reshape(-1, 1) if scale.numel() > 1 else scale)
            scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale
        ref = src.read(name).float()
        bound = _REL_TOL * ref.abs() + scale * 2.0 ** -9 + 1e-30
        if not bool(((w - ref).abs() <= bound).all()):
            raise DiffgenError(f"verification failed: {name} in {out} differs from the source weight by more "
                               "than FP8 rounding allows")


def quantize(src, dst, *, quantization: str = "fp8", scheme: str = "per-channel", ignored_layers=(),
             overwrite: bool = False) -> dict:
    """Quantize the 16-bit transformer directory ``src`` into an fp8 checkpoint at ``dst``.

    ``scheme``: ``per-channel`` (default), ``per-tensor`` or ``block`` (128x128 weight blocks).
    ``ignored_layers`` use the dotted-boundary patterns of ``--quantization-ignored-layers``.
    Returns statistics: layers quantized and kept, tensors, shards, bytes.
    """
    if quantization != "fp8":
        raise DiffgenError(f"diffgen.quantize writes 'fp8' checkpoints; {quantization!r} is not supported here")
    if scheme not in ("per-channel", "per-tensor", "block"):
        raise DiffgenError(f"unknown fp8 scheme {scheme!r}; use per-channel, per-tensor or block")
    dst = Path(dst)
    refuse_existing(dst, overwrite)
    source = open_checkpoint(src)
    resolve_claim(source, QuantRequest("fp8", tuple(ignored_layers)), get_plugin_host())  # refuses quantized input
    model = build_meta_model(source)
    linears = [spec.name for spec in linear_layers(model, torch.bfloat16)]
    kept = [n for n in linears if default_online_ignore(type(model).__name__, n)
            or any(matches_user_pattern(p, n) for p in ignored_layers)]
    config = QuantConfig.make("fp8", scheme=scheme, params={"activation_scheme": "dynamic"},
                              user_ignore=tuple(ignored_layers), ignore=tuple(kept), online=True)
    target = RepackTarget("checkpoint", type(model).__name__, dict(source.config), {}, tuple(linears))
    stream = get_plugin_host().repack_checkpoint(config, source.iter_tensors(), target, first="fp8")
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        manifest, files = write_shards(stream, tmp, shard_bytes=SHARD_BYTES)
        finish_layout(tmp, manifest, files)
        cfg = dict(source.config)
        cfg["quantization_config"] = fp8_plugin.checkpoint_quantization_config(scheme, kept)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        _verify(tmp, source, manifest, scheme)
    return {"output": str(dst), "scheme": scheme, "quantized_layers": len(linears) - len(kept),
            "kept_16bit_layers": len(kept), "tensors": len(manifest), "shards": len(files)}
