"""Tiny diffusers models and pipelines: diffgen's offline default model, and the test models.

Built offline from configs, with random weights. Re-exports the three modules that build them:
`transformers` (one tiny transformer per model family), `tokenizers` (in-code vocabularies) and
`pipelines` (full pipelines written in diffusers layout, and the cached embedded default that
`diffgen generate` runs without --model-path). Runtime code: it imports no test tool.
"""

from diffgen.tiny.pipelines import (
    EMBEDDED_DEFAULT_VERSION,
    TINY_PIPELINE_FAMILIES,
    build_tiny_pipeline,
    embedded_default_pipeline,
    tiny_pipeline,
)
from diffgen.tiny.transformers import (
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
