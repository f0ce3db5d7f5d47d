"""``diffgen.quantize``: a quantized checkpoint from a 16-bit diffusers transformer, written by any
installed quantizer.

A plugin publishes a :class:`Quantizer` in the entry-point group ``diffgen.quantizers``; the entry
point's name is the ``--quantization`` value. What it writes is what online quantization of the
same name computes while loading: the one plan (``diffgen.plan``) with that request decides which
layers are quantized and which stay 16-bit, and the plugins' ``repack_checkpoint`` hooks (target
kind ``"checkpoint"``) turn the planned layers' weights into the format's tensors. The quantizer
adds what config.json declares and how one written layer is checked against its source.

The output is written to a temporary directory beside the destination, re-read and checked
(claimed again as this format and scheme, every tensor as written, every quantized layer within
its format's rounding of the source weight), and only then renamed into place, so an interrupted
run leaves nothing half-written. This module never imports the generation pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import open_checkpoint
from ..checkpoint_writer import atomic_directory, check_manifest, finish_layout, refuse_existing, write_shards
from ..errors import DiffgenError
from ..hub import resolve_transformer
from ..plan import LoadPlan, plan, resolve_claim
from ..platform import resolve
from ..plugins import QUANTIZERS, PluginHost, get_plugin_host
from ..quant import QuantConfig, QuantRequest

SHARD_BYTES = 4 << 30


@dataclass(frozen=True)
class Quantizer:
    """An offline quantization scheme, as a plugin publishes it.

    ``summary``: one line for ``diffgen quantize --help``. ``schemes``: the ``--scheme`` values,
    the first being the default; the plugin's ``detect_quant_config`` receives the chosen one as
    ``request.scheme``. ``quantization_config(config, kept)``: config.json's
    ``quantization_config`` for the online config the plugin claimed and the layers kept in
    16-bit. ``check_layer(layer, tensors, weight)``: what is wrong with one written layer (its
    tensors by suffix, and the 16-bit source weight), or None.
    """

    summary: str
    schemes: tuple[str, ...]
    quantization_config: Callable[[QuantConfig, list[str]], dict]
    check_layer: Callable[[str, dict[str, torch.Tensor], torch.Tensor], str | None]


def load_quantizer(name: str, host: PluginHost) -> Quantizer:
    installed = host.extensions(QUANTIZERS)
    if name not in installed:
        raise DiffgenError(f"no installed plugin publishes a quantizer named {name!r} (installed: "
                           f"{', '.join(sorted(installed)) or 'none'}); see `diffgen quantize --help`")
    quantizer = host.load_extension(installed[name])
    if not isinstance(quantizer, Quantizer):
        raise DiffgenError(f"plugin {installed[name].plugin} publishes quantizer {name!r} as "
                           f"{type(quantizer).__name__}, not a diffgen.tools.quantize.Quantizer")
    return quantizer


def _verify(out: Path, source, manifest: dict, planned: LoadPlan, quantizer: Quantizer, host: PluginHost) -> None:
    written = open_checkpoint(out)
    _, claim = resolve_claim(written, None, host)
    want = planned.config
    if claim is None or claim.config.family != want.family or claim.config.scheme != want.scheme:
        found = f"{claim.config.family} {claim.config.scheme}" if claim else "no claim"
        raise DiffgenError(f"verification failed: {out} is detected as {found}, not as the "
                           f"{want.family} {want.scheme} checkpoint that was written")
    check_manifest(written, manifest)
    quantized = set(planned.quantized())
    layers: dict[str, list[str]] = {}
    for name in manifest:
        owner, _, suffix = name.rpartition(".")
        if owner in quantized:
            layers.setdefault(owner, []).append(suffix)
    for layer in quantized:
        tensors = {suffix: written.read(f"{layer}.{suffix}") for suffix in layers.get(layer, [])}
        problem = "no tensors were written" if not tensors else \
            quantizer.check_layer(layer, tensors, source.read(f"{layer}.weight"))
        if problem:
            raise DiffgenError(f"verification failed: layer {layer} in {out}: {problem}")


def quantize(src, dst, *, quantization: str = "fp8", scheme: str | None = None, ignored_layers=(),
             quantize_all_layers: bool = False, overwrite: bool = False) -> dict:
    """Quantize the 16-bit transformer directory ``src`` into a checkpoint at ``dst``.

    ``quantization``: an installed quantizer (``diffgen quantize --help`` lists them); ``scheme``:
    one of its schemes (default: its first). ``ignored_layers`` use the containment patterns
    of ``--quantization-ignored-layers``; diffgen's precision-sensitive defaults for the model class
    stay 16-bit too, as in online quantization, unless ``quantize_all_layers``. Returns statistics: layers quantized and kept,
    tensors, shards.
    """
    host = get_plugin_host()
    quantizer = load_quantizer(quantization, host)
    scheme = scheme or quantizer.schemes[0]
    if scheme not in quantizer.schemes:
        raise DiffgenError(f"quantizer {quantization!r} has schemes {', '.join(quantizer.schemes)}, not {scheme!r}")
    dst = Path(dst)
    refuse_existing(dst, overwrite)
    source = open_checkpoint(resolve_transformer(src))  # a folder or a Hugging Face repo ID
    # The layers kept 16-bit do not depend on the machine; plan where every format has a method.
    platform, dtype = resolve("cpu", torch.bfloat16)
    planned = plan(source, platform=platform, dtype=dtype, host=host,
                   request=QuantRequest(quantization, tuple(ignored_layers), scheme, quantize_all_layers))
    stream = host.repack_checkpoint(planned.config, planned.source.iter_tensors(), planned.target("checkpoint"),
                                    first=planned.claim.plugin)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        manifest, files = write_shards(stream, tmp, shard_bytes=SHARD_BYTES)
        finish_layout(tmp, manifest, files)
        config = dict(source.config)
        config["quantization_config"] = quantizer.quantization_config(planned.config, planned.kept())
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _verify(tmp, planned.source, manifest, planned, quantizer, host)
    return {"output": str(dst), "quantization": quantization, "scheme": scheme,
            "quantized_layers": len(planned.quantized()), "kept_16bit_layers": len(planned.kept()),
            "tensors": len(manifest), "shards": len(files)}
