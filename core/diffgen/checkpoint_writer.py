"""Write a diffusers-layout checkpoint directory from a tensor stream, atomically.

The counterpart of ``checkpoint.py`` for the tools that write checkpoints (``diffgen quantize``,
plugins' converters such as ``diffgen convert modelopt-fp8``). It imports neither the loader nor
the generation pipeline. The rules every writer follows (design.md): write to a temporary
directory beside the destination, re-read and check what was written, then rename into place, so
an interrupted or failed run leaves nothing half-written and never loses the old output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from .errors import DiffgenError

WEIGHTS_STEM = "diffusion_pytorch_model"
Manifest = dict[str, tuple[torch.dtype, tuple[int, ...], int]]  # name -> (dtype, shape, shard number)


def write_shards(stream: Iterable[tuple[str, torch.Tensor]], out: Path, *, shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> tuple[Manifest, list[str]]:
    """Write the stream into shards of about ``shard_bytes``; holds one shard in memory at a time.

    Returns the manifest and the (temporary) shard file names; ``finish_layout`` names them.
    """
    manifest: Manifest = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"{WEIGHTS_STEM}-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt", **(metadata or {})})
            files.append(name)
            shard, size = {}, 0

    for name, tensor in stream:
        if name in manifest:
            raise DiffgenError(f"tensor {name!r} was produced twice; a checkpoint holds each name once")
        tensor = tensor.contiguous()
        manifest[name] = (tensor.dtype, tuple(tensor.shape), len(files))
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    return manifest, files


def finish_layout(out: Path, manifest: Manifest, files: list[str], *, always_index: bool = False) -> list[str]:
    """Name shards as diffusers does and write the index.

    One shard becomes ``diffusion_pytorch_model.safetensors`` without an index, unless
    ``always_index``; several become ``...-0000k-of-0000N.safetensors`` with
    ``diffusion_pytorch_model.safetensors.index.json``. Returns the final file names.
    """
    if len(files) == 1 and not always_index:
        (out / files[0]).rename(out / f"{WEIGHTS_STEM}.safetensors")
        return [f"{WEIGHTS_STEM}.safetensors"]
    final = [f"{WEIGHTS_STEM}-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for old, new in zip(files, final):
        (out / old).rename(out / new)
    total = sum(torch.empty((), dtype=d).element_size() * int(torch.tensor(s).prod()) for d, s, _ in manifest.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: final[i] for n, (_, _, i) in manifest.items()}}
    (out / f"{WEIGHTS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return final


def check_manifest(written, manifest: Manifest) -> None:
    """Every tensor reads back (from ``written``, a CheckpointSource) with the dtype and shape written."""
    for name, (dtype, shape, _) in manifest.items():
        info = written.info(name)
        if info.dtype != dtype or tuple(info.shape) != shape:
            raise DiffgenError(f"verification failed: {name} was written as {dtype}{list(shape)} but reads "
                               f"back as {info.dtype}{list(info.shape)} from {info.file}")
    extra = sorted(set(written.tensors) - set(manifest))
    if extra:
        raise DiffgenError(f"verification failed: {len(extra)} tensors read back that were not written "
                           f"(e.g. {', '.join(extra[:5])})")


def refuse_existing(dst: Path, overwrite: bool) -> None:
    """Before any work: ``dst`` may not exist (or, with ``overwrite``, must be a directory, which is
    what gets replaced), and its parent must take a new directory."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise DiffgenError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise DiffgenError(f"{dst} is not a checkpoint directory; --overwrite replaces a directory this tool "
                               "wrote, never a file or a link: remove it yourself or choose another output")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{dst.name}.probe-", dir=dst.parent))
        probe.rmdir()
    except OSError as exc:
        raise DiffgenError(f"cannot write beside {dst}: {exc.strerror or exc}") from exc


OWNER_FILE = ".diffgen-owner-pid"


def staging_directory(parent: Path, prefix: str) -> Path:
    """A new hidden directory in ``parent`` for building something that is renamed into place
    when done. ``mkdtemp`` makes it 0700; after the rename it is the user's output, so it gets the
    mode their umask gives any new directory, like every other tool's output. Staging directories
    of the same prefix whose writing process is gone (killed mid-write) are removed first; the
    owner's pid is kept in each, and its file removed before the rename."""
    for stale in parent.glob(f"{glob_escape(prefix)}*"):
        owner = stale / OWNER_FILE
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being created: leave it
        if not _alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~_umask())
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def release_staging(path: Path) -> None:
    """Make a finished staging directory the user's: no owner file, modes as the umask says."""
    (path / OWNER_FILE).unlink(missing_ok=True)
    follow_umask(path)


def follow_umask(root: Path) -> None:
    """Give every file under ``root`` the mode the umask gives new files (safetensors writes 0600)."""
    mode = 0o666 & ~_umask()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


@contextmanager
def atomic_directory(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it replaces ``dst``.

    On any exception the temporary directory is removed and ``dst`` is left as it was.
    """
    dst = Path(dst)
    refuse_existing(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_directory(dst.parent, f".{dst.name}.tmp-")
    try:
        yield tmp
        release_staging(tmp)
        if dst.exists():
            # A fresh name for the replaced directory: a user's own ".name.old" is never touched.
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.replaced-", dir=dst.parent))
            old.rmdir()
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
