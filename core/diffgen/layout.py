"""A checkpoint seen in the model's own names, before any tensor data is read.

Checkpoints come in layouts other than diffusers': Black Forest Labs' single files (fused
``qkv``, ``linear1``), ComfyUI's prefixed copies of them, SGLang's runtime names. The plugins'
``repack_checkpoint`` hooks turn those into diffusers' names as tensors stream in; the planner
needs that answer earlier, to detect the format and decide every layer from the names the model
really has. :func:`in_model_layout` runs the same hooks once over the safetensors header, with
``meta`` tensors standing for the data (``RepackTarget.kind == "layout"``), and returns a source
whose names, shapes and dtypes are what the stream will deliver. Only layout plugins act on that
kind; format repacks (scales spread per fused shard, quantization) run later, at load time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from .checkpoint import CheckpointSource, TensorIndex, TensorInfo
from .quant import RepackTarget


class ModelLayoutSource(TensorIndex):
    """``raw`` as the layout repacks deliver it; everything else (config, sidecars, files,
    metadata) is the raw source's. Each tensor's ``file`` is the file of the tensor it came from."""

    def __init__(self, raw: CheckpointSource, host, target: RepackTarget,
                 tensors: dict[str, TensorInfo], origin: dict[str, str]):
        self.raw, self._host, self._target = raw, host, target
        self.tensors = tensors
        self._origin = origin  # model name -> the raw tensor it is cut from
        self.root, self.files, self.config = raw.root, raw.files, raw.config
        self.sidecars, self.metadata = raw.sidecars, raw.metadata
        self.declared_in = getattr(raw, "declared_in", "config.json")

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        names = None if names is None else list(names)
        wanted = None if names is None else set(names)
        raw_names = None if names is None else list(dict.fromkeys(self._origin[self.info(n).name] for n in names))
        stream = self._host.repack_checkpoint(None, self.raw.iter_tensors(raw_names), self._target)
        for name, tensor in stream:
            if wanted is None or name in wanted:
                yield name, tensor

    def read(self, name: str) -> torch.Tensor:
        found = next((t for n, t in self.iter_tensors([name]) if n == name), None)
        if found is None:  # a repack that buffers may deliver it after a later raw tensor
            found = next(t for n, t in self.iter_tensors() if n == name)
        return found

    def describe(self) -> str:
        return f"{self.raw.describe()}, in the model's layout"

    def __repr__(self) -> str:
        return f"ModelLayoutSource({self.describe()})"


def in_model_layout(source, host, target: RepackTarget):
    """``source`` itself when the layout hooks change nothing, else a :class:`ModelLayoutSource`."""
    target = replace(target, kind="layout")
    last: list[str] = []

    def header() -> Iterator[tuple[str, torch.Tensor]]:
        for name, info in source.tensors.items():
            last[:] = [name]
            yield name, torch.empty(info.shape, dtype=info.dtype, device="meta")

    tensors: dict[str, TensorInfo] = {}
    origin: dict[str, str] = {}
    for name, tensor in host.repack_checkpoint(None, header(), target):
        came_from = source.tensors[last[0]]
        tensors[name] = replace(came_from, name=name, dtype=tensor.dtype, shape=tuple(tensor.shape))
        origin[name] = last[0]
    same = tensors.keys() == source.tensors.keys() and all(
        (t.dtype, t.shape) == (source.tensors[n].dtype, source.tensors[n].shape) for n, t in tensors.items())
    return source if same else ModelLayoutSource(source, host, target, tensors, origin)
