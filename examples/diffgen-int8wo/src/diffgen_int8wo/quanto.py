"""``diffgen convert int8wo-from-quanto``: an optimum-quanto int8 checkpoint (what diffusers'
``QuantoConfig(weights_dtype="int8")`` saves) as an int8wo checkpoint, without requantizing.

quanto stores, per quantized linear (diffusers' ``save_pretrained``, optimum-quanto 0.2.7):
  weight._data   int8 [N, K]
  weight._scale  the model's float dtype [N, 1]; W ~= _data * _scale (symmetric, per output channel)
  input_scale, output_scale   scalars, 1 when only weights are quantized
with config.json ``quantization_config = {"quant_method": "quanto", "weights_dtype": "int8",
"modules_to_not_convert": [...]}``. That is int8wo's math exactly: ``weight = _data``,
``weight_scale = _scale`` as fp32 [N] (a widening, so lossless). Layers quanto left in 16-bit stay
as they are and are listed in ``ignored_layers``. Checkpoints that quantize activations too
(an input_scale other than 1) are refused: int8wo keeps activations 16-bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffgen.checkpoint import linears_stored_unquantized, open_checkpoint
from diffgen.checkpoint_writer import atomic_directory, check_manifest, finish_layout, refuse_existing, write_shards
from diffgen.errors import DiffgenError
from diffgen.hub import resolve_transformer
from diffgen.tools.convert import Converter

from . import plugin
from .format import quantization_config

SHARD_BYTES = 4 << 30


def _check_declaration(source) -> None:
    qc = source.config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "quanto":
        raise DiffgenError(f"not an optimum-quanto checkpoint (quant_method 'quanto'): config.json declares "
                           f"quantization_config={qc!r} ({source.describe()})")
    if qc.get("weights_dtype") != "int8":
        raise DiffgenError(f"only int8 quanto weights map onto int8wo, and this one has weights_dtype="
                           f"{qc.get('weights_dtype')!r} ({source.describe()})")


def converted_tensors(source):
    """quanto's names and layouts -> int8wo's, tensor by tensor (one shard in memory at a time)."""
    quantized = {n[: -len(".weight._data")] for n in source.tensors if n.endswith(".weight._data")}
    for name, tensor in source.iter_tensors():
        layer, _, leaf = name.rpartition(".")
        if name.endswith(".weight._data"):
            yield name[: -len("._data")], tensor
        elif name.endswith(".weight._scale"):
            yield name[: -len("._scale")] + "_scale", tensor.float().reshape(-1)
        elif leaf in ("input_scale", "output_scale") and layer in quantized:
            if leaf == "input_scale" and not bool((tensor.float() == 1).all()):
                raise DiffgenError(f"{name} in {source.file_of(name)} is {tensor.flatten()[:4].tolist()}: this "
                                   "quanto checkpoint quantizes activations, which int8wo keeps in 16-bit")
            continue  # weights-only quanto: both are 1 and int8wo has no use for them
        else:
            yield name, tensor


def verify(out: Path, source, manifest: dict) -> None:
    """Detected as int8wo; every tensor as written; every converted layer holds quanto's int8 values
    and its scales, widened to fp32 (so it decodes to quanto's weights)."""
    written = open_checkpoint(out)
    claim = plugin.detect_quant_config(written, None)
    if claim is None or claim.unsupported_reason:
        raise DiffgenError(f"verification failed: {out} is not detected as a loadable int8wo checkpoint")
    check_manifest(written, manifest)
    for name in manifest:
        if name.endswith(".weight_scale"):
            layer = name[: -len(".weight_scale")]
            same = (torch.equal(written.read(f"{layer}.weight"), source.read(f"{layer}.weight._data"))
                    and torch.equal(written.read(name), source.read(f"{layer}.weight._scale").float().reshape(-1)))
            if not same:
                raise DiffgenError(f"verification failed: {layer} in {out} does not hold quanto's values")


def convert(input_dir, output_dir, *, overwrite: bool = False) -> dict:
    output_dir = Path(output_dir)
    refuse_existing(output_dir, overwrite)
    source = open_checkpoint(resolve_transformer(input_dir))  # a folder or a Hugging Face repo ID
    _check_declaration(source)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        manifest, files = write_shards(converted_tensors(source), tmp, shard_bytes=SHARD_BYTES)
        finish_layout(tmp, manifest, files)
        kept = linears_stored_unquantized(open_checkpoint(tmp), ("weight_scale",))
        config = {**source.config, "quantization_config": quantization_config(kept)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        verify(tmp, source, manifest)
    return {"output": str(output_dir), "quantized_layers": sum(n.endswith(".weight_scale") for n in manifest),
            "kept_16bit_layers": len(kept), "tensors": len(manifest)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffgen convert int8wo-from-quanto", allow_abbrev=False,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--input-dir", required=True, help="the quanto transformer directory (config.json + safetensors)")
    parser.add_argument("--output-dir", required=True, help="written atomically; refused if it exists without --overwrite")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(convert(args.input_dir, args.output_dir, overwrite=args.overwrite), indent=2))
    return 0


CONVERTER = Converter(summary="an optimum-quanto int8 checkpoint (diffusers QuantoConfig) as int8wo, losslessly",
                      main=main)

if __name__ == "__main__":
    CONVERTER.run_as_script("diffgen convert int8wo-from-quanto")
