"""One safetensors file, read from its own bytes: the header is parsed and checked without
touching tensor data, and each tensor is later read alone (seek + read of its byte range).

Layout, from the safetensors format description: bytes 0..8 hold N, a little-endian u64; the
next N bytes are a UTF-8 JSON object ``{name: {"dtype": "F16", "shape": [..],
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``; the data region starts at 8 + N
and the offsets are relative to it. Tensor bytes are little-endian and C-contiguous, so this
module assumes a little-endian host.

Every header is treated as hostile: lengths, offsets, sizes and overlaps are checked against the
file before any tensor is handed out, and each failure is a CheckpointError naming the file (and
the tensor, where there is one).
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.errors import CheckpointError

# The safetensors library refuses larger headers too; a bigger N is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000

_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    # ROCm (MI300) exports; safetensors writes these names for torch's fnuz types.
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}

# Only the types this torch build has: an older torch simply does not read e.g. F8_E8M0 files.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``[start, end)`` are absolute byte offsets in ``file``.

    Tensors from a pickle checkpoint have no byte range; there ``start == end == 0``.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _DuplicateKey(ValueError):
    pass


# No real dimension comes near this; a larger one only overflows an allocation later.
MAX_DIM = 1 << 40


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal keys; a header naming one tensor twice is ambiguous.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of ``path``; return its tensors (in data order) and metadata."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"truncated safetensors file: {size} bytes, shorter than the 8-byte header "
                    "length", file=path)
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(
                    f"header length {header_len} beyond the file size {size}; the file is "
                    "truncated or not safetensors", file=path)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"header length {header_len} is unreasonable (limit {MAX_HEADER_BYTES} "
                    "bytes); the file is corrupt or not safetensors", file=path)
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file: {e}", file=path) from e
    if len(raw) != header_len:
        raise CheckpointError("truncated safetensors file: short read of the header", file=path)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(f"safetensors header is not UTF-8 JSON: {e}", file=path) from e
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", file=path)

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("__metadata__ must map strings to strings", file=path)

    data_start = 8 + header_len
    data_size = size - data_start
    tensors = [_check_entry(path, name, entry, data_start, data_size)
               for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.start, t.end, t.name))
    _check_no_overlap(path, tensors)
    _check_covered(path, tensors, data_start, data_size)
    return {t.name: t for t in tensors}, dict(metadata)


def _check_covered(path: Path, tensors: list[TensorInfo], data_start: int, data_size: int) -> None:
    """The tensors must tile the data region exactly, as the format requires (and the safetensors
    library checks): a gap or trailing bytes mean the offsets or the header length are off, and
    every tensor would be read from shifted bytes."""
    position = 0
    for t in tensors:
        if t.start == t.end:
            continue
        if t.start - data_start != position:
            raise CheckpointError(f"data_offsets leave bytes [{position}, {t.start - data_start}) of the data region "
                                  "to no tensor; the header is corrupt", file=path, tensor=t.name)
        position = t.end - data_start
    if position != data_size:
        raise CheckpointError(f"the data region holds {data_size} bytes but the tensors cover {position}; the header "
                              "length or the offsets are corrupt", file=path)


def _check_entry(path: Path, name: str, entry: object, data_start: int,
                 data_size: int) -> TensorInfo:
    def bad(message: str) -> CheckpointError:
        return CheckpointError(message, file=path, tensor=name)

    if not isinstance(entry, dict):
        raise bad("header entry is not a JSON object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise bad(f"header entry lacks {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {code!r}; this torch reads {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers up to {MAX_DIM}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] out of range: the data region holds "
                  f"{data_size} bytes (file truncated or header corrupt)")
    dtype = SAFETENSORS_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise bad(f"data_offsets span {end - begin} bytes but {code} {shape} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_no_overlap(path: Path, tensors: list[TensorInfo]) -> None:
    # ``tensors`` is sorted by start; empty tensors own no bytes and cannot collide.
    furthest: TensorInfo | None = None
    for t in tensors:
        if t.start == t.end:
            continue
        if furthest is not None and t.start < furthest.end:
            raise CheckpointError(
                f"data of tensors {furthest.name!r} and {t.name!r} overlap "
                f"([{furthest.start}, {furthest.end}) and [{t.start}, {t.end}))",
                file=path, tensor=t.name)
        if furthest is None or t.end > furthest.end:
            furthest = t


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux-like: no bound
        return None


# Reads from the page cache are a kernel memcpy, bound by one core: a large tensor is read in chunks
# by a few threads (os.preadv releases the GIL), which more than halves the time on a warm cache.
READ_CHUNK = 32 << 20
# ``iter_tensors`` also reads the next few tensors side by side (most tensors are smaller than a
# chunk, and a load of them one at a time left a reader idle while the caller handled each one):
# up to PREFETCH_TENSORS tensors or PREFETCH_BYTES bytes beyond the one being handed out.
PREFETCH_TENSORS = 4
PREFETCH_BYTES = 256 << 20
_POOL = None
_PREFETCH_POOL = None


def _forget_pools() -> None:
    # A forked child inherits the pool objects but not their threads: work sent to them would wait
    # forever. The child makes its own when it first reads.
    global _POOL, _PREFETCH_POOL
    _POOL = _PREFETCH_POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
# Set by the loader while it streams onto a CUDA device: tensors are then read into page-locked
# memory, so the copy to the device is a DMA that overlaps the next read instead of a synchronous
# staged copy. torch's host allocator caches those blocks, so a load pins only a few of them.
_PINNED = contextvars.ContextVar("diffgen_pinned_reads", default=False)


# Set by the loader while it streams onto the CPU with weight checks on: floating-point tensors are
# checked for NaN and infinity CHECK_STEP bytes at a time as they are read, while those bytes are
# still in the cache (after the read, the same check costs a second pass over memory), and a bad
# one stops the read, naming the tensor and the file.
_CHECKED = contextvars.ContextVar("diffgen_checked_reads", default=False)
CHECK_STEP = 4 << 20


@contextmanager
def checked_reads(on: bool = True):
    """Within the block, ``read_tensor`` checks floating-point tensors for NaN and infinity as it
    reads them when ``on``, and marks them (``finite.CHECKED_AT_READ``) so the loader does not
    check them again."""
    token = _CHECKED.set(on)
    try:
        yield
    finally:
        _CHECKED.reset(token)


@contextmanager
def pinned_reads(on: bool = True):
    """Within the block, ``read_tensor`` reads into pinned (page-locked) host memory when ``on``."""
    token = _PINNED.set(on)
    try:
        yield
    finally:
        _PINNED.reset(token)


def _reader_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="diffgen-read")
    return _POOL


def _prefetch_pool():
    """Whole-tensor reads; separate from the chunk pool, whose threads these reads wait on."""
    global _PREFETCH_POOL
    if _PREFETCH_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _PREFETCH_POOL = ThreadPoolExecutor(max_workers=PREFETCH_TENSORS, thread_name_prefix="diffgen-prefetch")
    return _PREFETCH_POOL


def _pread_into(fd: int, buf: torch.Tensor, view: memoryview, chunk: tuple[int, int], info: TensorInfo,
                check: bool) -> None:
    """Read bytes ``chunk`` of ``info`` into ``view`` (of ``buf``); with ``check``, each CHECK_STEP
    bytes are checked for NaN and infinity as soon as they are read."""
    from .finite import all_finite_cpu, refusal

    begin, end = chunk
    while begin < end:
        stop = min(begin + CHECK_STEP, end) if check else end  # CHECK_STEP and READ_CHUNK: whole elements
        got = 0
        while begin + got < stop:
            n = os.preadv(fd, [view[begin + got:stop]], info.start + begin + got)
            if not n:
                raise CheckpointError(
                    f"short read: {begin + got} of {len(view)} bytes at offset {info.start}; the file was "
                    "truncated or changed after it was opened", file=info.file, tensor=info.name)
            got += n
        if check and not all_finite_cpu(buf[begin:stop].view(info.dtype)):
            raise refusal(info.name, str(info.file))
        begin = stop


def read_tensor(f, info: TensorInfo, pinned: bool | None = None, check: bool | None = None) -> torch.Tensor:
    """Read ``info``'s bytes from the open binary file ``f`` into a tensor that owns them, in
    page-locked memory when ``pinned``, checking floating-point values for NaN and infinity as they
    arrive when ``check`` (defaults: as ``pinned_reads`` and ``checked_reads`` say in this context)."""
    if info.numel == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    available = _available_memory()
    if available is not None and info.nbytes > available:
        # A sparse file may declare a terabyte; allocating it would end in the kernel's OOM killer.
        raise CheckpointError(f"tensor needs {info.nbytes} bytes and this machine has {available} free; the file "
                              "is corrupt or far larger than this machine can load", file=info.file, tensor=info.name)
    # Read into torch's own allocation: it is aligned the way CPU kernels expect, so a loaded
    # model computes bit-identically to one diffusers loads (a bytearray is only 16-byte aligned).
    buf = torch.empty(info.end - info.start, dtype=torch.uint8,
                      pin_memory=_PINNED.get() if pinned is None else pinned)
    view = memoryview(buf.numpy())
    check = (_CHECKED.get() if check is None else check) and info.dtype.is_floating_point
    chunks = [(begin, min(begin + READ_CHUNK, len(view))) for begin in range(0, len(view), READ_CHUNK)]
    if len(chunks) > 1:  # a large tensor: its chunks are read side by side, as a parallel memcpy would copy
        list(_reader_pool().map(lambda c: _pread_into(f.fileno(), buf, view, c, info, check), chunks))
    elif chunks:
        _pread_into(f.fileno(), buf, view, chunks[0], info, check)
    tensor = buf.view(info.dtype).reshape(info.shape)
    if check:
        from .finite import CHECKED_AT_READ

        setattr(tensor, CHECKED_AT_READ, True)
    return tensor


class SafetensorsFile:
    """One safetensors file with its header parsed and validated at construction.

    No file handle stays open between calls, so any number of these can exist at once.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)

    def _infos(self, names: Iterable[str] | None) -> list[TensorInfo]:
        if names is None:
            return list(self.tensors.values())
        wanted = set(names)
        unknown = sorted(wanted.difference(self.tensors))
        if unknown:
            raise CheckpointError(f"no such tensor(s): {', '.join(unknown)}", file=self.path,
                                  tensor=unknown[0])
        return [t for t in self.tensors.values() if t.name in wanted]

    def _open(self):
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open safetensors file: {e}", file=self.path) from e

    def read(self, name: str) -> torch.Tensor:
        (info,) = self._infos([name])
        with self._open() as f:
            return read_tensor(f, info)

    def iter_tensors(self, names: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in data order, reading each tensor as it is reached."""
        infos = self._infos(names)
        if not infos:
            return
        with self._open() as f:
            if PREFETCH_TENSORS <= 1 or len(infos) == 1:
                for info in infos:
                    yield info.name, read_tensor(f, info)
                return
            yield from _prefetched(f, infos)


def _prefetched(f, infos: list[TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``infos`` in order, the next few read ahead on the prefetch pool.
    A read's error is raised at its tensor's turn; on an early stop the reads in flight are
    finished (or cancelled) before the file closes."""
    from collections import deque

    pinned, check, pool = _PINNED.get(), _CHECKED.get(), _prefetch_pool()
    pending: deque = deque()
    ahead = 0
    try:
        for info in infos:
            pending.append((info, pool.submit(read_tensor, f, info, pinned, check)))
            ahead += info.nbytes
            while pending and (len(pending) > PREFETCH_TENSORS or ahead > PREFETCH_BYTES):
                done, future = pending.popleft()
                ahead -= done.nbytes
                yield done.name, future.result()
        while pending:
            done, future = pending.popleft()
            yield done.name, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        for _, future in pending:
            if not future.cancelled():
                future.exception()  # waits; the file must outlive every read of it
