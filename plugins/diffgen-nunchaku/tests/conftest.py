"""Shared fixtures: tiny SVDQuant checkpoints of each family, built once per session."""

import diffusers
import pytest
import torch

from diffgen.tiny.pipelines import build_tiny_pipeline
import svdq_writer as W
from svdq_families import RANK, WIDE


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """family, precision -> (pipeline dir, svdq file, 16-bit model, records)."""
    built = {}

    def get(family, precision="int4"):
        if (family, precision) not in built:
            root = tmp_path_factory.mktemp(f"{family}-{precision}")
            pipe = build_tiny_pipeline(family, root / "pipe", seed=0)
            cls, kwargs = WIDE[family]
            torch.manual_seed(0)
            model = getattr(diffusers, cls)(**kwargs).eval()
            model.save_pretrained(pipe / "transformer")
            tensors, records = W.quantize_model(model, precision, rank=RANK)
            path = root / f"svdq-{'int4' if precision == 'int4' else 'fp4'}_r{RANK}-tiny-{family}.safetensors"
            W.write(path, tensors, W.metadata(model, precision, RANK))
            built[(family, precision)] = (pipe, path, model, records)
        return built[(family, precision)]

    return get


