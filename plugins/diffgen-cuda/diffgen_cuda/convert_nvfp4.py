"""``diffgen convert modelopt-nvfp4``: a mixed BF16 + NVFP4 transformer from a ModelOpt NVFP4 export and
the base BF16 transformer it was made from (what SGLang's ``build_modelopt_nvfp4_transformer`` builds).

Per module of the export, first match wins:
1. BF16 fallback (``--pattern-preset``, ``--keep-bf16-pattern``; globs, ``*`` any run of characters,
   matched against the whole module name): every tensor of the module comes from the base
   transformer, the export's NVFP4 tensors of it are dropped, and the module joins ``ignore``.
2. Otherwise as exported; ``--swap-weight-nibbles`` exchanges the two codes of every packed byte
   (for files packed high-nibble-first; ModelOpt's own exports are low-nibble-first: keep it off).
``*_quantizer.*`` buffers are dropped. The result is written to a temporary directory, re-read
(detected as NVFP4, fallbacks equal to the base, packed weights equal to the export's, every 16-bit
linear in ``ignore``) and only then renamed into place. Never imports the generation pipeline.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Iterator

import torch

from diffgen.checkpoint import CheckpointSource, open_checkpoint
from diffgen.checkpoint_writer import atomic_directory, check_manifest, finish_layout, refuse_existing, write_shards
from diffgen.errors import DiffgenError
from diffgen.numerics.e2m1 import swap_nibbles
from diffgen.quant import matches_glob
from diffgen.tools.convert import Converter

from . import modelopt, nvfp4
from .convert import SHARD_BYTES, _transformer_dir

# Modules SGLang's validated FLUX.1 NVFP4 builder keeps in BF16: the modulation linears and the MLPs.
PRESETS: dict[str, tuple[str, ...]] = {
    "flux1-nvfp4": ("transformer_blocks.*.norm1.linear*", "transformer_blocks.*.norm1_context.linear*",
                    "transformer_blocks.*.ff.net.0.proj*", "transformer_blocks.*.ff.net.2*",
                    "transformer_blocks.*.ff_context.net.0.proj*", "transformer_blocks.*.ff_context.net.2*",
                    "single_transformer_blocks.*.norm.linear*", "single_transformer_blocks.*.proj_mlp*"),
    "none": (),
}


def _glob(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", ".*"))


def fallback_modules(source: CheckpointSource, base: CheckpointSource, patterns: tuple[str, ...]) -> list[str]:
    """Modules of the export matching a pattern, which the base transformer has a weight for."""
    compiled = [_glob(p) for p in patterns]
    modules = {n.rpartition(".")[0] for n in source.tensors if n.endswith(".weight")}
    chosen = sorted(m for m in modules if any(c.fullmatch(m) for c in compiled))
    missing = [m for m in chosen if f"{m}.weight" not in base.tensors]
    if missing:
        raise DiffgenError(f"BF16 fallback {missing[0]!r}: the base transformer {base.describe()} has no "
                           f"{missing[0]}.weight; is it the model this export was made from?")
    return chosen


def converted_tensors(source: CheckpointSource, base: CheckpointSource, fallback: set[str], swap: bool,
                      stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for module in sorted(fallback):
        for name in (n for n in base.tensors if n.rpartition(".")[0] == module):
            yield name, base.read(name)
            stats["replaced_tensors"] += 1
    for name, tensor in source.iter_tensors():
        module, _, leaf = name.rpartition(".")
        if "_quantizer." in name or module in fallback:
            stats["removed_aux_tensors"] += leaf != "weight" and leaf != "bias"
            continue
        if swap and leaf == "weight" and tensor.dtype == torch.uint8:
            tensor = swap_nibbles(tensor)
        yield name, tensor


def verify(out: Path, manifest: dict, source: CheckpointSource, base: CheckpointSource, fallback: set[str],
           swap: bool) -> None:
    written = open_checkpoint(out)
    claim = modelopt.detect(written)
    if claim is None or claim.unsupported_reason or claim.config.family != nvfp4.FAMILY:
        raise DiffgenError(f"verification failed: {out} is not detected as a ModelOpt NVFP4 checkpoint")
    check_manifest(written, manifest)
    ignore = written.config["quantization_config"]["ignore"]
    for name, info in written.tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in fallback:
            if not torch.equal(written.read(name), base.read(name)):
                raise DiffgenError(f"verification failed: fallback {name} differs from the base transformer's")
        elif leaf == "weight" and info.dtype == torch.uint8:
            expected = source.read(name)
            if not torch.equal(written.read(name), swap_nibbles(expected) if swap else expected):
                raise DiffgenError(f"verification failed: {name} is not the export's packed weight")
        elif leaf == "weight" and len(info.shape) == 2 and not any(matches_glob(p, module) for p in ignore):
            raise DiffgenError(f"verification failed: 16-bit linear {module} is not in the written ignore list")


def convert(modelopt_hf_dir, base_transformer_dir, output_dir, *, pattern_preset: str = "none",
            keep_bf16_patterns: tuple[str, ...] = (), swap_weight_nibbles: bool = False,
            overwrite: bool = False) -> dict:
    """Build the mixed transformer at ``output_dir``; returns the statistics ``main`` prints."""
    refuse_existing(Path(output_dir), overwrite)
    if pattern_preset not in PRESETS:
        raise DiffgenError(f"--pattern-preset {pattern_preset!r}: choose {', '.join(PRESETS)}")
    source = open_checkpoint(_transformer_dir(modelopt_hf_dir, "--modelopt-hf-dir"))
    decl = modelopt.read_declaration(source)
    if decl is None or decl.algo not in modelopt.NVFP4_SCHEMES or source.config.get("quantization_config") is None:
        found = f"quant_algo {decl.algo} in {decl.where}" if decl else "no ModelOpt quantization_config"
        raise DiffgenError(f"diffgen convert modelopt-nvfp4 converts ModelOpt NVFP4 exports with a flat "
                           f"quantization_config in config.json; this one has {found} ({source.describe()})")
    base = open_checkpoint(_transformer_dir(base_transformer_dir, "--base-transformer-dir"))
    fallback = set(fallback_modules(source, base, PRESETS[pattern_preset] + tuple(keep_bf16_patterns)))
    stats = {"output": str(output_dir), "fallback_modules": len(fallback), "replaced_tensors": 0,
             "removed_aux_tensors": 0, "output_shards": 0, "swap_weight_nibbles": swap_weight_nibbles}
    qc = dict(source.config["quantization_config"])
    qc["ignore"] = sorted({*decl.ignore, *fallback})
    qc["swap_weight_nibbles"] = False  # what is written is low-nibble-first, whatever came in
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        manifest, files = write_shards(converted_tensors(source, base, fallback, swap_weight_nibbles, stats), tmp,
                                       shard_bytes=SHARD_BYTES, metadata={"quantization_config": json.dumps(qc)})
        stats["output_shards"] = len(finish_layout(tmp, manifest, files, always_index=True))
        (tmp / "config.json").write_text(json.dumps({**source.config, "quantization_config": qc}, indent=2,
                                                    sort_keys=True))
        verify(tmp, manifest, source, base, fallback, swap_weight_nibbles)
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffgen convert modelopt-nvfp4", allow_abbrev=False,
                                description="Build a mixed BF16 + NVFP4 transformer from a ModelOpt NVFP4 export "
                                            "and the base BF16 transformer.")
    p.add_argument("--modelopt-hf-dir", required=True, help="ModelOpt --hf-ckpt-dir output, or its transformer/")
    p.add_argument("--base-transformer-dir", required=True, help="the 16-bit transformer the export was made from")
    p.add_argument("--output-dir", required=True, help="written atomically; refused if it exists without --overwrite")
    p.add_argument("--pattern-preset", default="none", choices=list(PRESETS),
                   help="modules kept BF16 (flux1-nvfp4: SGLang's validated FLUX.1 choice; default: none)")
    p.add_argument("--keep-bf16-pattern", action="append", default=[], metavar="GLOB",
                   help="also keep modules matching GLOB ('*' any characters, whole module name) in BF16")
    p.add_argument("--swap-weight-nibbles", action=argparse.BooleanOptionalAction, default=False,
                   help="the export packs element 2i in the high nibble (ModelOpt's does not; default: off)")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stats = convert(args.modelopt_hf_dir, args.base_transformer_dir, args.output_dir,
                    pattern_preset=args.pattern_preset, keep_bf16_patterns=tuple(args.keep_bf16_pattern),
                    swap_weight_nibbles=args.swap_weight_nibbles, overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0


CONVERTER = Converter(summary="a mixed BF16 + NVFP4 transformer from a ModelOpt NVFP4 export and the base BF16 "
                              "transformer (SGLang's build_modelopt_nvfp4_transformer)", main=main)


if __name__ == "__main__":
    CONVERTER.run_as_script("diffgen convert modelopt-nvfp4")
