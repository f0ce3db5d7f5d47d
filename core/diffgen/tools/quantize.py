"""``diffgen.quantize``: write an FP8 checkpoint from a 16-bit diffusers transformer.

The output is written to a temporary directory beside the destination, re-read and checked
(detected as fp8, every tensor as written, every weight within FP8 rounding of the original),
and only then renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..builtin import fp8 as fp8_plugin
from ..checkpoint import open_checkpoint
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


def _write_shards(stream, out: Path) -> tuple[dict[str, tuple], list[str]]:
    manifest: dict[str, tuple] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"diffusion_pytorch_model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            shard, size = {}, 0

    for name, tensor in stream:
        tensor = tensor.contiguous()
        manifest[name] = (tensor.dtype, tuple(tensor.shape), len(files))
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    return manifest, files


def _finish_layout(out: Path, manifest: dict, files: list[str]) -> None:
    """Name shards as diffusers does and write an index when there is more than one."""
    if len(files) == 1:
        (out / files[0]).rename(out / "diffusion_pytorch_model.safetensors")
        return
    final = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for old, new in zip(files, final):
        (out / old).rename(out / new)
    total = sum(torch.empty((), dtype=d).element_size() * int(torch.tensor(s).prod()) for d, s, _ in manifest.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: final[i] for n, (_, _, i) in manifest.items()}}
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _verify(out: Path, src, manifest: dict, scheme: str) -> None:
    written = open_checkpoint(out)
    _, claim = resolve_claim(written, None, get_plugin_host())
    if claim is None or claim.config.family != "fp8" or claim.config.scheme != scheme:
        raise DiffgenError(f"verification failed: {out} is not detected as an fp8 {scheme} checkpoint")
    for name, (dtype, shape, _) in manifest.items():
        info = written.info(name)
        if info.dtype != dtype or tuple(info.shape) != shape:
            raise DiffgenError(f"verification failed: {name} was written as {dtype}{list(shape)} but reads "
                               f"back as {info.dtype}{list(info.shape)} from {info.file}")
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
    if dst.exists() and not overwrite:
        raise DiffgenError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
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
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        manifest, files = _write_shards(stream, tmp)
        _finish_layout(tmp, manifest, files)
        cfg = dict(source.config)
        cfg["quantization_config"] = fp8_plugin.checkpoint_quantization_config(scheme, kept)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        _verify(tmp, source, manifest, scheme)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": str(dst), "scheme": scheme, "quantized_layers": len(linears) - len(kept),
            "kept_16bit_layers": len(kept), "tensors": len(manifest), "shards": len(files)}
