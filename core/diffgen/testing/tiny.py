"""Tiny diffusers models and pipelines for tests and for diffgen's offline default model.

Re-exports the three modules that build them: `tiny_transformers` (one tiny transformer per
model family), `tiny_tokenizers` (in-code vocabularies) and `tiny_pipelines` (full pipelines
written in diffusers layout, and the cached embedded default).
"""

from diffgen.testing.tiny_pipelines import (
    EMBEDDED_DEFAULT_VERSION,
    TINY_PIPELINE_FAMILIES,
    build_tiny_pipeline,
    embedded_default_pipeline,
    tiny_pipeline,
)
from diffgen.testing.tiny_transformers import (
    TINY_TRANSFORMERS,
    linear_shape_exceptions,
    save_tiny_transformer,
    tiny_transformer,
    tiny_transformer_inputs,
)

__all__ = [
    "EMBEDDED_DEFAULT_VERSION",
    "TINY_PIPELINE_FAMILIES",
    "TINY_TRANSFORMERS",
    "build_tiny_pipeline",
    "embedded_default_pipeline",
    "linear_shape_exceptions",
    "save_tiny_transformer",
    "tiny_pipeline",
    "tiny_transformer",
    "tiny_transformer_inputs",
]
