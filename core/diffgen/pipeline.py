"""Assemble a diffusers pipeline whose transformer(s) diffgen loaded, with component overrides."""

from __future__ import annotations

import importlib
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import PICKLE_SUFFIXES
from .errors import CheckpointError, DiffgenError
from .hub import resolve_component, resolve_pipeline, resolve_weights
from .loader import Progress, load_transformer
from .platform import Platform, resolve

if TYPE_CHECKING:
    from .parallel import ParallelConfig


def read_model_index(model_path: str | Path) -> dict:
    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        raise DiffgenError(f"{model_path} has no model_index.json; --model-path must be a diffusers "
                           "pipeline directory (the folder with model_index.json and one folder per component)")
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"model_index.json is not valid JSON: {exc}", file=index) from exc
    if not isinstance(data, dict) or "_class_name" not in data:
        raise CheckpointError("model_index.json has no _class_name", file=index)
    return data


def pipeline_components(index: dict) -> dict[str, tuple[str, str]]:
    """component name -> (library, class name), for the components the pipeline really has."""
    return {k: tuple(v) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]}


def is_transformer_component(name: str, entry: tuple[str, str]) -> bool:
    return entry[0] == "diffusers" and name.startswith("transformer")


def transformer_names(pipe) -> list[str]:
    """The loaded pipeline's transformer components (``transformer``, ``transformer_2``)."""
    return [n for n, c in pipe.components.items() if n.startswith("transformer") and c is not None]


def load_pipeline(model_path: str | Path, *, transformer_path: str | Path | None = None,
                  transformer_weights_path: str | Path | None = None,
                  component_paths: dict[str, Any] | None = None,
                  component_weights_paths: dict[str, Any] | None = None,
                  quantization: str | None = None, quantization_ignored_layers=(), quantize_all_layers: bool = False,
                  quant_backend: str | None = None, device: str | Platform | None = None,
                  dtype: str | torch.dtype = "auto", allow_pickle: bool = False,
                  progress: Progress | None = None, check_weights: bool = True, enable_svdquant: bool = False,
                  quantization_precision: str | None = None, quantization_rank: int | None = None,
                  parallel: "ParallelConfig | None" = None, attention: str | None = None):
    """A ``diffusers.DiffusionPipeline`` whose transformer components diffgen loaded.

    ``quantization`` applies to every transformer component (``transformer``, ``transformer_2``);
    ``transformer_path`` / ``component_paths[name]`` replace a whole component directory, and
    ``transformer_weights_path`` / ``component_weights_paths[name]`` only its weights (a path that
    names one weights file means the latter, as in SGLang-Diffusion).
    Every path may instead be a Hugging Face repo ID (``owner/name``, ``owner/name@revision``,
    ``owner/name/transformer``, a huggingface.co URL; see ``diffgen.hub``): only the files the load
    needs are fetched into the hub cache, and none of a component the caller replaces.
    ``device`` and ``dtype`` as in ``load_transformer``; every component gets the same.
    ``parallel`` (``diffgen.parallel.ParallelConfig``, SGLang-Diffusion's degrees) splits the
    transformers over the processes of this run (started by ``diffgen --num-gpus`` or torchrun):
    the degrees are checked against each transformer's config before any weight is read.
    ``attention`` routes every transformer's attention to a plugin's backend, as in ``load_transformer``.
    """
    import diffusers

    if parallel is not None and parallel.enabled:
        from .parallel import rank_device

        parallel = parallel.resolved()
        device = device if isinstance(device, Platform) else rank_device(device)
    platform, dtype = resolve(device, dtype)
    paths = dict(component_paths or {})
    weights = dict(component_weights_paths or {})
    if transformer_path is not None:
        paths["transformer"] = transformer_path
    if transformer_weights_path is not None:
        weights["transformer"] = transformer_weights_path
    for name, path in list(paths.items()):
        # SGLang-Diffusion's rule: a component path naming one weights file overrides only the weights.
        if name not in weights and Path(path).is_file() and Path(path).suffix in (".safetensors", *PICKLE_SUFFIXES):
            weights[name] = paths.pop(name)
    model_path = resolve_pipeline(model_path, skip=paths, skip_weights=weights)
    paths = {name: resolve_component(path, weights=name not in weights) for name, path in paths.items()}
    weights = {name: resolve_weights(path) for name, path in weights.items()}
    index = read_model_index(model_path)
    components = pipeline_components(index)
    for name in {*paths, *weights}:
        if name not in components:
            raise DiffgenError(f"unknown component {name!r}: {model_path} has {', '.join(sorted(components))}")
    for name, path in {**paths, **{f"{n}_weights": p for n, p in weights.items()}}.items():
        if not Path(path).exists():
            raise DiffgenError(f"--{name.replace('_', '-')}-path {path} does not exist: not a local path, and not a "
                               "Hugging Face repo ID (owner/name[@revision][/folder])")
    for name, entry in components.items():  # before any weight is read
        if not is_transformer_component(name, entry):  # transformers pass load_transformer's own gate
            _refuse_pickles(Path(paths.get(name, model_path / name)), name, allow_pickle)
    group = _join(parallel, components, paths, model_path, platform)
    loaded: dict[str, Any] = {}
    for name, entry in components.items():
        if is_transformer_component(name, entry):
            loaded[name] = load_transformer(
                paths.get(name, model_path / name), weights_path=weights.get(name),
                quantization=quantization, quantization_ignored_layers=quantization_ignored_layers,
                quantize_all_layers=quantize_all_layers, quant_backend=quant_backend, device=platform, dtype=dtype,
                allow_pickle=allow_pickle, progress=progress, check_weights=check_weights,
                enable_svdquant=enable_svdquant, quantization_precision=quantization_precision,
                quantization_rank=quantization_rank, attention=attention,
                tensor_parallel=None if group is None else group.tp_rank(),  # reads only this rank's slices
                # tensor parallelism splits the linears; the rewrites' fused Q/K/V would not split
                rewrites=parallel is None or parallel.tp_size == 1)
        elif name in weights:
            raise DiffgenError(f"--{name.replace('_', '-')}-weights-path: only transformer components take a "
                               f"weights-only override; use --{name.replace('_', '-')}-path with a whole component directory")
        elif name in paths:
            library, cls_name = entry
            cls = getattr(importlib.import_module(library), cls_name)
            kwargs = {"torch_dtype": dtype} if issubclass(cls, torch.nn.Module) else {}
            with _quiet_dtype_rename():
                loaded[name] = cls.from_pretrained(paths[name], **kwargs)
    pipeline_cls = getattr(diffusers, index["_class_name"], diffusers.DiffusionPipeline)
    try:
        with _quiet_dtype_rename():
            pipe = pipeline_cls.from_pretrained(model_path, torch_dtype=dtype, **loaded)
    except (ImportError, AttributeError, OSError) as exc:
        # e.g. Qwen-Image-Edit's Qwen2VLProcessor needs torchvision and fails deep in transformers.
        raise DiffgenError(f"diffusers could not assemble {pipeline_cls.__name__} from {model_path}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                           "(a component's library may be missing, e.g. torchvision for Qwen2-VL processors)") from exc
    pipe = pipe.to(platform.device)
    if group is not None:
        from .parallel import parallelize

        parallelize(pipe, group, [pipe.components[name] for name in transformer_names(pipe)])
    return pipe


def _join(parallel, components: dict, paths: dict, model_path: Path, platform: Platform):
    """Check the degrees against each transformer's config.json, then join the process group."""
    if parallel is None or not parallel.enabled:
        return None
    from .parallel import check_model, join

    for name, entry in components.items():
        config_file = Path(paths.get(name, model_path / name)) / "config.json"
        if is_transformer_component(name, entry) and config_file.is_file():
            check_model(parallel, json.loads(config_file.read_text()), str(config_file))
    return join(parallel, platform.device_kind)


class _PilFallbackFilter(logging.Filter):
    """transformers >= 5 warns, once per class, that an image processor falls back to its PIL
    version without torchvision. diffusers touches those classes while assembling any pipeline,
    even one that has no image processor, so every load printed two lines that ask the user for
    nothing; they are dropped (other transformers warnings pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_PilFallbackFilter())


def _refuse_pickles(folder: Path, name: str, allow_pickle: bool) -> None:
    """A component whose weights are only pickles (.bin, .pt, ...) loads through torch.load, which
    can run code: the same --trust-pickle gate as the transformers' (diffusers and transformers
    take safetensors first whenever they are there)."""
    if allow_pickle or not folder.is_dir():
        return
    files = [p for p in folder.iterdir() if p.is_file()]
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles and not any(p.name.endswith(".safetensors") for p in files):
        raise DiffgenError(f"component {name!r} holds only pickle weights ({', '.join(sorted(pickles)[:3])}), "
                           f"which can run code when loaded; pass allow_pickle=True / --trust-pickle if you trust "
                           f"{folder}")


@contextmanager
def _quiet_dtype_rename():
    """diffusers >= 0.41 renamed ``torch_dtype`` to ``dtype`` and warns; older ones only know the
    first. Keep the name every supported version accepts, without the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)
        yield
