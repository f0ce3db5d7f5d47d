"""Shared fixtures: isolated plugins, tiny transformers saved at test time."""

from __future__ import annotations

import pytest
import torch

from diffgen.plugins import reset_plugins
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs


@pytest.fixture(autouse=True)
def isolated_plugins(monkeypatch):
    """Third-party plugins installed in this environment must not leak into core tests; a test
    that wants them sets DIFFGEN_PLUGINS itself."""
    monkeypatch.setenv("DIFFGEN_PLUGINS", "")
    for var in ("DIFFGEN_DISABLE_PLUGINS", "DIFFGEN_STRICT_PLUGINS", "DIFFGEN_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny 16-bit (fp32 on disk) FluxTransformer2DModel directory."""
    return save_tiny_transformer("flux1", tmp_path_factory.mktemp("flux") / "transformer", seed=0,
                                 dtype=torch.float32)


@pytest.fixture(scope="session")
def flux_inputs():
    model = tiny_transformer("flux1", seed=0)
    return tiny_transformer_inputs("flux1", model, seed=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return (out[0] if isinstance(out, list) else out).float()
