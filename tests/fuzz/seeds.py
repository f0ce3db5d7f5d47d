"""The valid checkpoints the fuzzer mutates, built at test time from tiny diffusers models.

Every seed is a small transformer directory (config.json + safetensors), mostly FLUX.1: 16-bit, the
builtin fp8 family in its three schemes (written by ``diffgen.quantize``), and ModelOpt's FP8,
per-channel FP8 and NVFP4 exports (the committed diffgen-cuda fixtures); Wan, Qwen-Image and
HunyuanVideo seeds bring their classes' own config fields. ``sharded`` seeds hold the
same tensors split over three files with an index, for the directory-layout mutations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
MODELOPT_FIXTURES = REPO / "plugins" / "diffgen-cuda" / "tests" / "fixtures"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# seed name -> family of its quantized layers (None: 16-bit), for the mutators that target scales
SEEDS: dict[str, str | None] = {
    "bf16": None, "fp8-per-tensor": "fp8", "fp8-per-channel": "fp8", "fp8-block": "fp8",
    "modelopt-fp8": "fp8", "modelopt-fp8-per-channel": "fp8", "modelopt-nvfp4": "nvfp4",
    "bf16-sharded": None, "fp8-per-tensor-sharded": "fp8", "modelopt-nvfp4-sharded": "nvfp4",
    # other diffusers classes, for their own config fields (patch tuples, qk_norm names, rope lengths)
    "wan-bf16": None, "wan-fp8-per-channel": "fp8", "qwen_image-bf16": None, "hunyuan_video-fp8-block": "fp8",
}


def read_tensors(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata of one safetensors file, read by the safetensors library."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def shard(src: Path, dst: Path, parts: int = 3) -> Path:
    """``src``'s single file as ``parts`` shards named like diffusers' (``-0000k-of-0000N``) plus
    an index; tensors are dealt round-robin so every shard holds some of each kind."""
    shutil.copytree(src, dst)
    (dst / WEIGHTS).unlink()
    tensors, metadata = read_tensors(src / WEIGHTS)
    groups: list[dict] = [{} for _ in range(parts)]
    for i, (name, tensor) in enumerate(sorted(tensors.items())):
        groups[i % parts][name] = tensor.contiguous()
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{parts:05d}.safetensors"
        save_file(group, dst / name, metadata=metadata)
        weight_map.update(dict.fromkeys(group, name))
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
    return dst


def build_seeds(root: Path) -> dict[str, Path]:
    """Write every seed under ``root``; returns seed name -> directory."""
    import diffgen
    from tests.plugin_fixtures import save_tiny_flux

    root.mkdir(parents=True, exist_ok=True)
    out = {"bf16": save_tiny_flux(root / "bf16")}
    for scheme in ("per-tensor", "per-channel", "block"):
        diffgen.quantize(out["bf16"], root / f"fp8-{scheme}", scheme=scheme)
        out[f"fp8-{scheme}"] = root / f"fp8-{scheme}"
    for name, fixture in (("modelopt-fp8", "flux1-fp8"), ("modelopt-fp8-per-channel", "flux1-fp8-per-channel"),
                          ("modelopt-nvfp4", "flux1-nvfp4")):
        out[name] = Path(shutil.copytree(MODELOPT_FIXTURES / fixture / "hf", root / name))
    from diffgen.tiny.transformers import save_tiny_transformer

    for family in ("wan", "qwen_image", "hunyuan_video"):
        out[f"{family}-bf16"] = save_tiny_transformer(family, root / f"{family}-bf16")
    diffgen.quantize(out["wan-bf16"], root / "wan-fp8-per-channel", scheme="per-channel")
    out["wan-fp8-per-channel"] = root / "wan-fp8-per-channel"
    diffgen.quantize(out.pop("hunyuan_video-bf16"), root / "hunyuan_video-fp8-block", scheme="block")
    out["hunyuan_video-fp8-block"] = root / "hunyuan_video-fp8-block"
    for name in ("bf16", "fp8-per-tensor", "modelopt-nvfp4"):
        out[f"{name}-sharded"] = shard(out[name], root / f"{name}-sharded")
    for name, path in out.items():  # diffgen.quantize writes an index for one shard too: normalise
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if len(files) == 1 and files[0] != WEIGHTS:
            (path / files[0]).rename(path / WEIGHTS)
            (path / INDEX).unlink(missing_ok=True)
    assert set(out) == set(SEEDS), sorted(set(out) ^ set(SEEDS))
    return out
