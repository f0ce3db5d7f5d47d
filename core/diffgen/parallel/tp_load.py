"""Tensor parallelism at load time: each rank reads only its slices of the planned linears.

``prepare(planned, rank, size)`` runs after planning and before any weight is read. It asks each
planned linear's method how its tensors split (``LinearMethod.tp_shards``; a refusal stops the
load here, naming the layer), then shrinks the meta model's planned linears to this rank's part:
their parameters take the sliced shapes, ``in_features`` / ``out_features`` and the method's
``LayerSpec`` the rank's numbers. The returned :class:`SplitLoad` then serves the loader:

- ``stream(source)``: the checkpoint's tensors, for a plain safetensors source, as views of the
  file's pages (``mmap``, copy-on-write): a view costs no read until its bytes are touched, so the
  plugins' repacks pass untouched tensors through for free and only the bytes of this rank's slice
  are ever read (at the page granularity of the file system: a column slice of rows narrower than
  a page touches most of the tensor's pages, though it copies only its part). Any other source
  (pickles, layouts converted on the fly) is read whole, then sliced: the device and the host
  still hold the rank's part only, one tensor at a time.
- ``take(name, tensor)``: the rank's slice of one arriving tensor (a copy owned by the model),
  counting the bytes copied out of the checkpoint in ``bytes_read``; the tensor's pages then
  leave the process (``madvise(MADV_DONTNEED)``), so the host memory a load touches beyond the
  rank's model stays near one tensor, not one shard.

Each quantized layer's ``process_weights_after_loading`` then runs on its slice. What a method
derives per output row (FP8 row scales, NVFP4 W4A8's FP8 grid) is the whole layer's for a
column-parallel slice; for a row-parallel slice it is computed over the rank's K columns, a grid
no coarser than one process's (online FP8 per-channel quantizes each rank's columns with their own
row scale; NVFP4 W4A8 fits its FP8 row scale to the rank's blocks): valid numbers, but not one
process's bit for bit. ``tp_runtime.shard_model`` then finds the model split and only adds the
row-parallel all-reduces and divides the attention heads.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..linear import QuantLinear, ShardError
from .tensor import layer_shards, style_of, tp_plan
from .tp_norm import across_heads_norms
from .tp_runtime import own_tensors, packed_runs, rank_part, replace_tensors


class SplitLoad:
    """One rank's split of a planned model, for the loader (see the module docstring)."""

    def __init__(self, rank: int, size: int, full: dict[str, torch.Tensor], target,
                 splits: dict[str, tuple], expected: dict[str, torch.Tensor]):
        self.rank, self.size = rank, size
        self.full = full            # name -> the whole tensor's meta (what the checkpoint holds)
        self.target = target        # the repack target in whole shapes (repacks see whole tensors)
        self.splits = splits        # name -> (TensorShard, packed runs or None)
        self.expected = expected    # name -> the rank's meta tensor (shape and dtype to fill)
        self.bytes_read = 0
        self.mapped = False
        self._pages: dict[str, tuple[mmap.mmap, int, int]] = {}  # name -> (its file's mapping, byte range)

    def stream(self, source) -> Iterator[tuple[str, torch.Tensor]]:
        from ..checkpoint import CheckpointSource
        from ..safetensors_header import SafetensorsFile

        readers = getattr(source, "_readers", {})
        if type(source) is CheckpointSource and readers and all(isinstance(r, SafetensorsFile)
                                                                for r in readers.values()):
            self.mapped = True
            return _mapped_tensors(source, self._pages)
        return source.iter_tensors()

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        split = self.splits.get(name)
        if split is not None:
            shard, runs = split
            out = rank_part(tensor, shard, self.rank, self.size, name, runs)
            if out is tensor:  # a scalar: the same on every rank
                out = tensor.clone() if self.mapped else tensor
        else:
            out = tensor.clone() if self.mapped else tensor  # a view of the file: own it
        self.bytes_read += out.numel() * out.element_size()
        self._release(name)
        return out

    def _release(self, name: str) -> None:
        """Drop the pages of ``name``'s bytes from this process once its slice is copied out (a
        private mapping forgets them; the page cache keeps them), so the host memory the read
        touched does not pile up over a shard. Pages shared with a neighbouring tensor stay."""
        entry = self._pages.pop(name, None)
        if entry is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        pages, start, end = entry
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            pages.madvise(mmap.MADV_DONTNEED, first, last - first)


def prepare(planned, rank: int, size: int) -> SplitLoad:
    """Shrink ``planned.model``'s planned linears to rank ``rank`` of ``size``; raises ShardError
    (before anything is changed) where a layer cannot split."""
    model = planned.model
    full, target = planned.expected(), planned.target("runtime")
    plan = tp_plan(model)
    raw = getattr(type(model), "_tp_plan", None) or {}
    todo, splits = [], {}
    for name, module in model.named_modules():
        style = style_of(plan, name)
        if style is None or not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        shards = layer_shards(module, name, style, size)
        runs = packed_runs(model, name, module, raw) if style == "rowwise" else None
        new = {}
        for key, tensor in own_tensors(module):
            new[key] = rank_part(tensor, shards.get(key), rank, size, f"{name}.{key}", runs)
            if shards.get(key) is not None and tensor is not None and tensor.shape:
                splits[f"{name}.{key}"] = (shards[key], runs)
        todo.append((module, new))
    attention = [m for m in model.modules() if hasattr(m, "heads") and hasattr(m, "to_q")]
    for m in attention:
        if m.heads % size:
            raise ShardError(f"--tp-size {size} does not divide the {m.heads} attention heads of "
                             f"{type(model).__name__}; each rank computes whole heads")
    across_heads_norms(attention, size)  # a norm tp_runtime could not split refuses now, before any read
    for module, new in todo:
        replace_tensors(module, new)
    model.diffgen_tp_split = (rank, size)
    return SplitLoad(rank, size, full, target, splits, planned.expected())


def _mapped_tensors(source, pages_of: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``source``'s safetensors files as a view of the file's pages, shard by
    shard in data order (the order ``CheckpointSource.iter_tensors`` reads them); ``pages_of``
    receives each name's mapping and byte range."""
    by_file: dict[Path, list] = {}
    for info in source.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    for path in source.files:
        infos = sorted(by_file.get(path, []), key=lambda i: i.start)
        if not infos:
            continue
        with open(path, "rb") as f:
            pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the views keep it open
        for info in infos:
            if info.numel == 0:
                yield info.name, torch.empty(info.shape, dtype=info.dtype)
                continue
            view = torch.frombuffer(pages, dtype=info.dtype, count=info.numel, offset=info.start)
            pages_of[info.name] = (pages, info.start, info.end)
            yield info.name, view.reshape(info.shape)
