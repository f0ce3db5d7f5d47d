"""The image or video token count of a run, from the configs alone, so a sequence degree that does
not divide it is refused before any weight is read. Known for FLUX.1 and Wan; for other families
the split check at the transformer's first call (``context._check_splits``) refuses it instead,
still on every rank alike and before any attention runs."""

from __future__ import annotations

import json
from pathlib import Path

from .config import ParallelConfig, check_sequence


def _config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def image_tokens(model_path: str | Path, height: int, width: int, num_frames: int | None) -> int | None:
    """The tokens the transformer of the pipeline at ``model_path`` sees at this size, or None
    where diffgen does not know the family's arithmetic."""
    root = Path(model_path)
    pipeline = _config(root / "model_index.json").get("_class_name", "")
    vae = _config(root / "vae" / "config.json")
    transformer = _config(root / "transformer" / "config.json")
    if pipeline.startswith("Flux") and "Flux2" not in pipeline and "block_out_channels" in vae:
        # FluxPipeline: latents of (height / vae scale) packed 2 x 2 into tokens
        scale = 2 ** (len(vae["block_out_channels"]) - 1) * 2
        return (height // scale) * (width // scale)
    if pipeline.startswith("Wan") and "scale_factor_spatial" in vae:
        spatial, temporal = vae["scale_factor_spatial"], vae.get("scale_factor_temporal", 4)
        patch = transformer.get("patch_size", (1, 2, 2))
        frames = ((num_frames or 81) - 1) // temporal + 1
        return frames // patch[0] * (height // spatial // patch[1]) * (width // spatial // patch[2])
    return None


def check_image_tokens(parallel: ParallelConfig, model_path, height: int | None, width: int | None,
                       num_frames: int | None) -> None:
    if parallel.resolved().sp_degree == 1 or not height or not width:
        return
    tokens = image_tokens(model_path, height, width, num_frames)
    if tokens is not None:
        size = f"{width}x{height}" + (f", {num_frames} frames" if num_frames else "")
        check_sequence(parallel, tokens, f"the image at {size}")
