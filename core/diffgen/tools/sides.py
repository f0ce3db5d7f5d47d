"""The two sides that ``compare`` and ``bench`` run, and how each gets its pipeline.

A side is one of:
- a ``PipelineConfig``: a pipeline directory plus overrides and quantization, loaded with
  ``diffgen.load_pipeline`` (what the CLI builds from ``--model-path`` and the side's flags);
- a ``PipelineFactory``: a zero-argument callable that builds a pipeline in memory, with a
  description for the JSON (the GPU benchmark's random FLUX.1-dev-sized model, which never
  touches disk);
- a ready ``DiffusionPipeline`` (or any zero-argument callable returning one).

Configs and factories are loaded just before their side runs and dropped after it, so the two
sides never hold device memory at the same time; a ready pipeline stays the caller's.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Union

import torch

from ..platform import Platform


@dataclass(frozen=True)
class PipelineConfig:
    """What one side loads; the arguments of ``diffgen.load_pipeline`` less device and dtype."""

    model_path: str
    transformer_path: str | None = None
    transformer_weights_path: str | None = None
    component_paths: dict[str, str] = field(default_factory=dict)
    component_weights_paths: dict[str, str] = field(default_factory=dict)
    quantization: str | None = None
    quantization_ignored_layers: tuple[str, ...] = ()
    quant_backend: str | None = None
    allow_pickle: bool = False
    # SGLang-Diffusion's SVDQuant flags: they describe the checkpoint, which must agree
    enable_svdquant: bool = False
    quantization_precision: str | None = None
    quantization_rank: int | None = None
    attention: str | None = None  # an attention backend (diffgen.attention); None: diffusers' own
    parallel: Any = None  # a diffgen.parallel.ParallelConfig: split over the processes of this run

    def to_dict(self) -> dict:
        out = asdict(self)
        out["quantization_ignored_layers"] = list(self.quantization_ignored_layers)
        return {k: (str(v) if k.endswith("_path") and v is not None else v) for k, v in out.items()}

    def load(self, platform: Platform, dtype: torch.dtype, progress=None):
        from ..pipeline import load_pipeline

        return load_pipeline(
            self.model_path, transformer_path=self.transformer_path,
            transformer_weights_path=self.transformer_weights_path, component_paths=dict(self.component_paths),
            component_weights_paths=dict(self.component_weights_paths), quantization=self.quantization,
            quantization_ignored_layers=self.quantization_ignored_layers, quant_backend=self.quant_backend,
            device=platform, dtype=dtype, allow_pickle=self.allow_pickle, progress=progress,
            enable_svdquant=self.enable_svdquant, quantization_precision=self.quantization_precision,
            quantization_rank=self.quantization_rank, attention=self.attention, parallel=self.parallel)


@dataclass(frozen=True)
class PipelineFactory:
    """A side built in memory: ``build()`` returns the pipeline, ``description`` is what the
    JSON says about it (how it was built, what is random, what was left out)."""

    build: Callable[[], Any]
    description: dict = field(default_factory=dict)


Side = Union[PipelineConfig, PipelineFactory, Any]  # Any: a DiffusionPipeline, or a callable returning one


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and callable(obj)  # DiffusionPipeline is itself callable


def open_side(side: Side, platform: Platform, dtype: torch.dtype) -> tuple[Any, bool]:
    """``(pipeline, owned)``: ``owned`` when this call built it (the caller then drops it)."""
    if isinstance(side, PipelineConfig):
        return side.load(platform, dtype), True
    if isinstance(side, PipelineFactory):
        return side.build(), True
    if _is_pipeline(side):
        return side, False
    if callable(side):
        return side(), True
    raise TypeError("a side is a PipelineConfig, a PipelineFactory, a pipeline or a callable, "
                    f"not {type(side).__name__}")


def describe_side(side: Side) -> dict:
    if isinstance(side, PipelineConfig):
        return {"kind": "config", **side.to_dict()}
    if isinstance(side, PipelineFactory):
        return {"kind": "in-memory", **side.description}
    if _is_pipeline(side):
        return {"kind": "pipeline object", "pipeline": type(side).__name__}
    return {"kind": "factory", "factory": getattr(side, "__qualname__", type(side).__name__)}


def free_device_memory() -> None:
    """Return what a dropped pipeline held, so the next side starts from an empty device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sampling_call_arguments(pipe, sampling, call_kwargs: dict | None, timer=None) -> dict:
    """``run.call_arguments`` plus the caller's extra arguments (the same for both sides); with
    ``prompt_embeds`` among them the text prompt is dropped, since diffusers refuses both at once."""
    from ..run import call_arguments

    kwargs = call_arguments(pipe, sampling, timer)
    kwargs.update(call_kwargs or {})
    if "prompt_embeds" in (call_kwargs or {}):
        kwargs.pop("prompt", None)
    return kwargs


def versions() -> dict:
    import diffusers

    from .. import __version__

    return {"diffgen": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda}
