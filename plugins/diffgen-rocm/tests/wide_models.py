"""Tiny transformers wide enough for online MXFP4, which keeps linears with fewer than 256 outputs
16-bit (every linear of diffgen's stock tiny models is narrower). Same class, inputs and
conditioning widths as the tiny pipeline's transformer, so one can replace it in the pipeline."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch

from diffgen.tiny.pipelines import tiny_pipeline
from diffgen.tiny.transformers import TINY_TRANSFORMERS

# attention_head_dim 128 (RoPE axes summing to it); the hidden size is heads * 128
WIDER = {"flux1": dict(attention_head_dim=128, axes_dims_rope=(16, 56, 56)),
         "wan": dict(attention_head_dim=128, ffn_dim=512)}


def wide_transformer(family: str, heads: int, seed: int = 0) -> torch.nn.Module:
    spec = TINY_TRANSFORMERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, spec["class_name"])(**{**spec["kwargs"], **WIDER[family], "num_attention_heads": heads})
    return model.float().eval()


def build_wide_pipeline(family: str, heads: int, directory: Path) -> Path:
    """The family's tiny pipeline with each transformer (Wan2.2: both experts) made wide."""
    pipe = tiny_pipeline(family, seed=0)
    for index, name in enumerate(n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None):
        setattr(pipe, name, wide_transformer(family, heads, seed=index * 4))
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
