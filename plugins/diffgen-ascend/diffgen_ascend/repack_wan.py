"""``diffgen repack wan`` (also ``diffgen convert wan``): msmodelslim's Wan2.2 output as a diffusers
pipeline (or transformer) diffgen and SGLang-Diffusion load, in one step.

Both argument forms of SGLang's tools/wan_repack.py:

  --model-type {Wan2.2-T2V-A14B, Wan2.2-I2V-A14B, Wan2.2-TI2V-5B} --original-model-path DIR
  --quant-path DIR --output-path DIR
      the original diffusers pipeline is copied without its transformer folders; the A14B models
      are cascades: quant-path/high_noise_model -> transformer/, quant-path/low_noise_model ->
      transformer_2/; TI2V-5B: quant-path -> transformer/. Each gets the original config.json.
  --input-path DIR --output-path DIR
      one msmodelslim output folder -> one transformer folder (its config.json copied if present).

Per transformer: every ``quant_model_weight*.safetensors`` is streamed tensor by tensor, renamed
from Wan's original names to diffusers' (``names.py``, norm2/norm3 swapped) with msmodelslim's
``.linear.`` and ``.div.`` wrapper names dropped, and written as diffusion_pytorch_model shards with
the first ``quant_model_description*.json``, keys renamed alike, as ``quant_model_description.json``.
Tensors keep their stored dtypes. Everything is written to a temporary folder beside the output,
re-read (every tensor's dtype and shape), planned again with the installed plugins (detection
confirms the description against the tensors; the model must expect exactly these tensors), and
renamed into place. This module never imports the generation pipeline.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from diffgen.checkpoint import open_checkpoint
from diffgen.checkpoint_writer import atomic_directory, check_manifest, finish_layout, refuse_existing, write_shards
from diffgen.errors import DiffgenError
from diffgen.safetensors_header import SafetensorsFile
from diffgen.tools.convert import Converter

from .description import PREFIX, description_file
from .names import is_wan_original_name, wan_original_to_diffusers_name

SHARD_BYTES = 5 << 30
CASCADE = {"Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"}
MODEL_TYPES = ("Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B", "Wan2.2-TI2V-5B")
DESCRIPTION = f"{PREFIX}.json"


def repacked_name(name: str) -> str:
    """An msmodelslim Wan tensor or description key in the runtime's names."""
    return wan_original_to_diffusers_name(name).replace(".linear.", ".").replace(".div.", ".")


def _weight_files(quant: Path) -> list[Path]:
    files = sorted(quant.glob("quant_model_weight*.safetensors"))
    if not files:
        raise DiffgenError(f"{quant} has no quant_model_weight*.safetensors: is it msmodelslim's output folder?")
    return files


def _description(quant: Path) -> dict:
    sidecars = {p.name: None for p in quant.glob(f"{PREFIX}*.json")}
    name = description_file(sidecars)
    if name is None:
        raise DiffgenError(f"{quant} has no {PREFIX}*.json beside its weights")
    try:
        value = json.loads((quant / name).read_text())
    except ValueError as exc:
        raise DiffgenError(f"{quant / name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DiffgenError(f"{quant / name} is not a JSON object")
    return value


def _renamed_stream(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    readers = [SafetensorsFile(f) for f in files]
    names = [n for r in readers for n in r.tensors]
    if names and not any(is_wan_original_name(n) for n in names):
        raise DiffgenError(f"{files[0].parent} holds no tensor in Wan's original names (e.g. {names[0]}); it is "
                           "in diffusers' names already: load it as it is, or use `diffgen repack SRC DST`")
    for reader in readers:
        for name, tensor in reader.iter_tensors():
            yield repacked_name(name), tensor


def write_transformer(quant: Path, out: Path, config: Path | None) -> dict:
    """One msmodelslim folder -> ``out`` (an existing, empty folder); returns the manifest."""
    weights = _weight_files(quant)
    description = _description(quant)
    manifest, files = write_shards(_renamed_stream(weights), out, shard_bytes=SHARD_BYTES)
    finish_layout(out, manifest, files)
    renamed = {repacked_name(k): v for k, v in description.items()}
    (out / DESCRIPTION).write_text(json.dumps(renamed, indent=2))
    if config is not None and config.is_file():
        shutil.copyfile(config, out / "config.json")
    return manifest


def verify_transformer(out: Path, manifest: dict) -> None:
    """Re-read what was written; with a config.json, plan it as a load would."""
    written = open_checkpoint(out)
    check_manifest(written, manifest)
    if not (out / "config.json").is_file():
        return
    from diffgen.plan import plan
    from diffgen.platform import resolve
    from diffgen.plugins import get_plugin_host

    platform, dtype = resolve("cpu", torch.bfloat16)
    planned = plan(written, platform=platform, dtype=dtype, host=get_plugin_host())
    if planned.config is None or planned.config.family != "msmodelslim":
        raise DiffgenError(f"verification failed: {out} was not recognised as an msmodelslim checkpoint")
    expected = set(planned.target("runtime").expected)
    extra = sorted(n for n in manifest if n not in expected)
    if extra:
        raise DiffgenError(f"verification failed: {planned.model_class} has no place for {', '.join(extra[:8])} "
                           f"written to {out}")


def repack_pipeline(model_type: str, original: Path, quant: Path, output: Path, overwrite: bool = False) -> dict:
    if model_type not in MODEL_TYPES:
        raise DiffgenError(f"--model-type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    if not (original / "model_index.json").is_file():
        raise DiffgenError(f"--original-model-path {original} is not a diffusers pipeline (no model_index.json)")
    parts = {"transformer": quant / "high_noise_model", "transformer_2": quant / "low_noise_model"} \
        if model_type in CASCADE else {"transformer": quant}
    for component, folder in parts.items():
        if not folder.is_dir():
            raise DiffgenError(f"{model_type} needs {folder} (for {component}); it does not exist")
        if not (original / component / "config.json").is_file():
            raise DiffgenError(f"--original-model-path {original} has no {component}/config.json")
    refuse_existing(output, overwrite)
    written = {}
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for entry in original.iterdir():
            if entry.name in parts:
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        for component, folder in parts.items():
            (tmp / component).mkdir()
            manifest = write_transformer(folder, tmp / component, original / component / "config.json")
            verify_transformer(tmp / component, manifest)
            written[component] = len(manifest)
    return {"output": str(output), "model_type": model_type, "tensors": written}


def repack_folder(input_path: Path, output: Path, overwrite: bool = False) -> dict:
    refuse_existing(output, overwrite)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        manifest = write_transformer(input_path, tmp, input_path / "config.json")
        verify_transformer(tmp, manifest)
    return {"output": str(output), "tensors": {"transformer": len(manifest)}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="diffgen repack wan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", choices=MODEL_TYPES)
    p.add_argument("--original-model-path", type=Path, help="the original diffusers Wan2.2 pipeline")
    p.add_argument("--quant-path", type=Path, help="msmodelslim's output (high_noise_model/, low_noise_model/ for A14B)")
    p.add_argument("--input-path", type=Path, help="old form: one msmodelslim output folder")
    p.add_argument("--output-path", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    new = (args.model_type, args.original_model_path, args.quant_path)
    if args.input_path is not None:
        if any(v is not None for v in new):
            raise DiffgenError("--input-path (old form) does not combine with --model-type/--original-model-path/--quant-path")
        stats = repack_folder(args.input_path, args.output_path, args.overwrite)
    elif all(v is not None for v in new):
        stats = repack_pipeline(*new, args.output_path, args.overwrite)
    else:
        raise DiffgenError("give --model-type, --original-model-path and --quant-path (or the old --input-path)")
    print(json.dumps(stats, indent=2))
    return 0


CONVERTER = Converter("msmodelslim Wan2.2 output -> diffusers layout (SGLang's wan_repack.py arguments)", main)

if __name__ == "__main__":
    CONVERTER.run_as_script("python -m diffgen_ascend.repack_wan")
