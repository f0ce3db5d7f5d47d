"""Where a component's weights are, and lazy access to them.

``open_checkpoint`` turns a path (component directory, single weight file, or sharded
``*.safetensors.index.json``) into a CheckpointSource: the component's config.json, its sidecar
JSON files, every tensor's name, dtype, shape and byte range (from safetensors headers only),
and readers that stream tensors shard by shard. Which files form the checkpoint:

- an index file is the authority on its shards (``weight_map`` values, in first-seen order);
  tensors a shard holds beyond its ``weight_map`` entries are loaded too, without complaint;
- without an index, ``*-mixed`` exports win over their full-precision siblings (FLUX.2 NVFP4
  ships both; the mixed one is what runs), and otherwise the files must be one file or one
  complete ``X-0000k-of-0000N`` set, since unrelated files are likely alternative variants.

Pickle checkpoints (.pt .pth .bin .ckpt) can run code when loaded; they are refused unless the
caller passes ``allow_pickle=True``, and even then load with torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from diffgen.errors import CheckpointError
from diffgen.safetensors_header import SAFETENSORS_DTYPES, SafetensorsFile, TensorInfo

__all__ = ["SAFETENSORS_DTYPES", "TensorInfo", "SafetensorsFile", "CheckpointSource",
           "TensorNotFoundError", "TensorIndex", "open_checkpoint", "select_weight_files"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d+)-of-(?P<total>\d+)$")
_MIXED_NAME = re.compile(r"-mixed(-\d+-of-\d+)?\.safetensors$")


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor name the checkpoint does not have; also a KeyError for mapping-style callers."""

    __str__ = BaseException.__str__  # KeyError's own str() would wrap the message in quotes


class _PickleFile:
    """A torch.save'd state dict behind the same interface as SafetensorsFile."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata: dict[str, str] = {}
        state = self._load()
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not isinstance(state, dict):
            raise CheckpointError(f"pickle checkpoint holds a {type(state).__name__}, not a "
                                  "dict of tensors", file=path)
        # Non-tensor entries (step counters, version strings) are not weights; they are skipped.
        self._state = {k: v for k, v in state.items()
                       if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if not self._state:
            raise CheckpointError("pickle checkpoint holds no tensors", file=path)
        self.tensors = {k: TensorInfo(k, v.dtype, tuple(v.shape), path, 0, 0)
                        for k, v in self._state.items()}

    def _load(self) -> Any:
        try:
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                    raise
                return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "refused"
            lines = str(e).splitlines() or [type(e).__name__]
            why = next((ln.strip() for ln in lines if "WeightsUnpickler" in ln), lines[0])
            raise CheckpointError(
                f"torch.load(weights_only=True) refused or failed to load this pickle: {why}. "
                "Convert it to safetensors in a trusted environment", file=self.path) from e

    def read(self, name: str) -> torch.Tensor:
        if name not in self._state:
            raise TensorNotFoundError(f"no tensor named {name!r}", file=self.path, tensor=name)
        # Detach from the mmap'd storage so the result stays valid on its own.
        return self._state[name].clone(memory_format=torch.contiguous_format)

    def iter_tensors(self, names: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = None if names is None else set(names)
        for name in self._state:
            if wanted is None or name in wanted:
                yield name, self.read(name)


@dataclass
class _WeightSet:
    files: list[Path]
    how: str                                   # "via index", "mixed export", ...
    base: Path                                 # directory the files are described under
    index: Path | None = None
    weight_map: dict[str, Path] | None = None  # tensor -> shard, when an index names them


class TensorIndex:
    """Name lookups over ``self.tensors`` (name -> TensorInfo), shared by every checkpoint source."""

    tensors: dict[str, TensorInfo]

    def describe(self) -> str:
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.tensors, n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise TensorNotFoundError(
                f"no tensor named {name!r} in {self.describe()}{hint}", tensor=name) from None

    def file_of(self, name: str) -> Path:
        return self.info(name).file


class CheckpointSource(TensorIndex):
    """The weights, config and sidecars of one component, with lazy tensor access."""

    def __init__(self, root: Path | None, weights: _WeightSet,
                 readers: list[SafetensorsFile | _PickleFile], config: dict,
                 sidecars: dict[str, Any], declared_in: str = "config.json"):
        self.root = root
        self.declared_in = declared_in  # where config["quantization_config"] was read, for evidence
        self.files: list[Path] = [r.path for r in readers]
        self.config = config
        self.sidecars = sidecars
        self.metadata: dict[Path, dict[str, str]] = {r.path: r.metadata for r in readers}
        self.tensors: dict[str, TensorInfo] = {}
        for reader in readers:
            for name, info in reader.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"tensor is in two weight files, {self.tensors[name].file} and "
                        f"{info.file}; they are not shards of one checkpoint",
                        file=info.file, tensor=name)
                self.tensors[name] = info
        self._weights = weights
        self._readers = {r.path: r for r in readers}

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self._readers[info.file].read(name)

    def iter_tensors(self, names: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` shard by shard, in data order within a shard.

        A shard's file is open only while its own tensors are being yielded.
        """
        by_file: dict[Path, list[str]] | None = None
        if names is not None:
            by_file = {}
            for name in names:
                by_file.setdefault(self.info(name).file, []).append(name)
        for path, reader in self._readers.items():
            if by_file is None:
                yield from reader.iter_tensors()
            elif path in by_file:
                yield from reader.iter_tensors(by_file[path])

    def describe(self) -> str:
        w = self._weights
        if len(self.files) == 1:
            return f"1 file {self.files[0]} ({w.how})"
        return f"{len(self.files)} shards under {w.base} ({_name_pattern(self.files)} {w.how})"

    def __repr__(self) -> str:
        return f"CheckpointSource({self.describe()})"


def _name_pattern(files: list[Path]) -> str:
    """``a-00001-of-00003.safetensors`` ... as ``a-0000X-of-00003.safetensors``, else the names."""
    matches = [_SHARD_NAME.match(_stem(f)) for f in files]
    keys = {(m["stem"], m["total"], f.name[len(_stem(f)):]) if m else None
            for m, f in zip(matches, files)}
    if None not in keys and len(keys) == 1:
        stem, total, suffix = keys.pop()
        width = len(matches[0]["number"])
        return f"{stem}-{'X'.rjust(width, '0')}-of-{total}{suffix}"
    names = [f.name for f in files]
    return ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")


def _stem(path: PurePosixPath | Path) -> str:
    """The name without its weight suffix (``.safetensors``, ``.pt``, ...)."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def _read_json_object(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {e}", file=path) from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} is not a JSON object (found {type(value).__name__})",
                              file=path)
    return value


def _inside_hub_blobs(real: Path, base: Path) -> bool:
    # The Hugging Face cache stores <repo>/snapshots/<rev>/<file> as symlinks into <repo>/blobs/;
    # those targets are part of the same download, not an escape.
    for folder in (base, *base.parents):
        if folder.parent.name == "snapshots":
            blobs = folder.parent.parent / "blobs"
            # A blobs folder that is itself a link (to "/", say) would vouch for any target.
            return not blobs.is_symlink() and real.is_relative_to(blobs.resolve())
    return False


def _stays_inside(path: Path, base: Path) -> bool:
    """``path`` (maybe a link) resolves inside ``base``, or into the hub cache's blobs of it."""
    real = path.resolve()
    return real.is_relative_to(base.resolve()) or _inside_hub_blobs(real, base)


def _index_shard_path(index: Path, entry: str, tensor: str) -> Path:
    base = index.parent.absolute()

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"index entry {entry!r} {why}; shards must be files inside "
                               f"{base}", file=index, tensor=tensor)

    if (not entry or PurePosixPath(entry).is_absolute() or PureWindowsPath(entry).anchor):
        raise refuse("is empty or an absolute path")
    lexical = os.path.normpath(entry.replace("\\", "/"))
    if lexical == ".." or lexical.startswith("../"):
        raise refuse("climbs out of the index's directory with '..'")
    if not entry.endswith(".safetensors"):
        raise refuse("is not a .safetensors file")
    if "\0" in entry or any(len(part.encode()) > 255 for part in lexical.split("/")):
        raise refuse("holds a NUL byte or a name longer than a file system allows")
    shard = base / lexical
    try:
        if not _stays_inside(shard, base):
            raise refuse(f"is a link that resolves outside, to {shard.resolve()}")
        present = shard.resolve().is_file()
    except (OSError, RuntimeError) as exc:  # a link loop, a path the OS refuses
        raise refuse(f"cannot be resolved ({exc})") from exc
    if not present:
        raise CheckpointError(f"shard named by the index {index} is missing", file=shard,
                              tensor=tensor)
    return shard


def _weights_from_index(index: Path) -> _WeightSet:
    data = _read_json_object(index, "safetensors index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("index has no non-empty 'weight_map' object", file=index)
    shards: dict[str, Path] = {}
    tensor_to_shard: dict[str, Path] = {}
    for tensor, entry in weight_map.items():
        if not isinstance(entry, str):
            raise CheckpointError(f"index maps a tensor to {entry!r}, not a file name",
                                  file=index, tensor=tensor)
        if entry not in shards:
            shards[entry] = _index_shard_path(index, entry, tensor)
        tensor_to_shard[tensor] = shards[entry]
    files = list(dict.fromkeys(shards.values()))  # "a.st" and "./a.st" are one shard
    return _WeightSet(files, "via index", index.parent, index=index,
                      weight_map=tensor_to_shard)


def _one_set(names: list[str], how: str, where: Path | str) -> list[str]:
    """Accept one file, or one complete ``X-0000k-of-0000N`` shard set; refuse anything else (a lone
    ``-00001-of-00003`` file is the first of three, not a checkpoint)."""
    sets: dict[tuple[str, str, str], dict[int, str]] = {}
    loose: list[str] = []
    for name in names:
        path = PurePosixPath(name)
        m = _SHARD_NAME.match(_stem(path))
        if m:
            sets.setdefault((m["stem"], m["total"], path.suffix), {})[int(m["number"])] = name
        else:
            loose.append(name)
    if len(names) == 1 and (loose or next(iter(sets))[1].lstrip("0") == "1"):
        return names
    if len(sets) == 1 and not loose:
        (stem, total, suffix), members = next(iter(sets.items()))
        # Compared by count first: a name may claim a total of 10**20 shards.
        complete = int(total) == len(members) and set(members) == set(range(1, len(members) + 1))
        if not complete:
            count = int(total)
            missing = sorted(set(range(1, count + 1)) - set(members))[:8] if count <= 100_000 else "most"
            extra = sorted(k for k in members if not 1 <= k <= count)[:8]
            raise CheckpointError(
                f"shard set {stem}-*-of-{total}{suffix} is incomplete or inconsistent: {len(members)} of "
                f"{total} shards present (missing shard numbers {missing}, unexpected {extra})", file=where)
        return [members[k] for k in sorted(members)]
    kind = "*-mixed exports" if how == "mixed export" else "weight files"
    raise CheckpointError(
        f"several {kind} that are not shards of one set: {', '.join(names)}. They look like independent "
        "variants of the model; pass the one to load with weights_path "
        "(--transformer-weights-path)", file=where)


def select_weight_files(names: Iterable[str], where: Path | str) -> tuple[list[str], str]:
    """Which of the file ``names`` in one directory (``where``, for messages) form the checkpoint,
    and how they were chosen: ``([index], "via index")``, or the weight files themselves. Works on
    names alone, so a hub repository's listing is judged before anything is downloaded."""
    names = sorted(names)
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise CheckpointError(f"several safetensors index files: {', '.join(indexes)}; pass the one to "
                              "load with weights_path", file=where)
    if indexes:
        return indexes, "via index"
    safetensors = [n for n in names if n.endswith(".safetensors")]
    mixed = [n for n in safetensors if _MIXED_NAME.search(n)]
    if mixed:
        return _one_set(mixed, "mixed export", where), "mixed export"
    if safetensors:
        return _one_set(safetensors, "directory listing", where), "directory listing"
    pickles = [n for n in names if PurePosixPath(n).suffix in PICKLE_SUFFIXES]
    if pickles:
        return _one_set(pickles, "pickle", where), "pickle"
    raise CheckpointError("no weights found: no *.safetensors, *.safetensors.index.json or pickle checkpoint "
                          "in this directory", file=where)


def _is_weights_name(name: str) -> bool:
    return name.endswith((INDEX_SUFFIX, ".safetensors", *PICKLE_SUFFIXES))


def _weights_from_directory(directory: Path) -> _WeightSet:
    names = []
    for p in directory.iterdir():
        try:
            regular = p.is_file()  # follows links: a link to a regular file is a file
        except OSError as exc:  # a link loop, a name the OS refuses
            raise CheckpointError(f"weights entry {p.name!r} cannot be read ({exc})", file=p) from exc
        if regular:
            names.append(p.name)
        elif _is_weights_name(p.name):
            # Named like weights, yet a FIFO, a device, a folder or a broken link: skipping it would
            # load the rest as if it were complete (a FIFO index would leave its shards to the listing).
            raise CheckpointError("named like a weights file, but it is not a regular file (a FIFO, device, "
                                  "directory or broken link); remove it or pass the weights to load with "
                                  "weights_path", file=p)
    chosen, how = select_weight_files(names, directory)
    if how == "via index":
        return _weights_from_index(directory / chosen[0])
    return _WeightSet([directory / n for n in chosen], how, directory)


def _weights_from_path(path: Path) -> _WeightSet:
    if path.is_dir():
        return _weights_from_directory(path)
    if not path.is_file():  # a FIFO or a device would block the reader or never end
        raise CheckpointError("weights path is neither a regular file nor a directory", file=path)
    if path.name.endswith(INDEX_SUFFIX):
        return _weights_from_index(path)
    if path.suffix == ".safetensors":
        return _WeightSet([path], "single file", path.parent)
    if path.suffix in PICKLE_SUFFIXES:
        return _WeightSet([path], "pickle", path.parent)
    raise CheckpointError(
        f"unsupported weight file type {path.suffix!r}: expected .safetensors, "
        f"*{INDEX_SUFFIX}, a directory, or a pickle ({', '.join(PICKLE_SUFFIXES)})", file=path)


def _open_weight_file(path: Path, allow_pickle: bool) -> SafetensorsFile | _PickleFile:
    if path.suffix not in PICKLE_SUFFIXES:
        return SafetensorsFile(path)
    if not allow_pickle:
        raise CheckpointError(
            "pickle checkpoints can run code; pass allow_pickle=True / --trust-pickle if you "
            "trust it (it is then loaded with torch.load(weights_only=True))", file=path)
    return _PickleFile(path)


def _check_weight_map(weights: _WeightSet, readers: dict[Path, SafetensorsFile]) -> None:
    for tensor, shard in (weights.weight_map or {}).items():
        if tensor not in readers[shard].tensors:
            raise CheckpointError(
                f"index {weights.index} maps this tensor to shard {shard.name}, but that shard's "
                "header does not have it", file=shard, tensor=tensor)


def _read_sidecars(root: Path) -> dict[str, Any]:
    sidecars = {}
    for path in sorted(root.glob("*.json")):
        if path.name == "config.json" or path.name.endswith(".index.json") or not path.is_file():
            continue
        sidecars[path.name] = _read_json_object(path, "sidecar JSON")
    return sidecars


def open_checkpoint(path: str | os.PathLike, *, weights_path: str | os.PathLike | None = None,
                    allow_pickle: bool = False) -> CheckpointSource:
    """Open a component's checkpoint; only headers are read, tensor data stays on disk.

    ``path``: a component directory (config.json + weights), a single weight file, or a
    ``*.safetensors.index.json``; for a file, config.json and sidecars come from its directory.
    ``weights_path``: where the weights come from instead (file, directory of shards, or
    index); the model's config.json comes from ``path``, while how the weights are quantized may
    come from beside them: a ``quantization_config`` in a config.json there, their sidecar JSON
    files (which win over ``path``'s), or a ``quantization_config`` in any file's safetensors
    metadata (used for any checkpoint whose config.json declares none). ``declared_in`` says
    which.
    ``allow_pickle``: accept .pt/.pth/.bin/.ckpt, loaded with ``weights_only=True``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint path does not exist", file=path)
    root = path if path.is_dir() else path.parent
    source = Path(weights_path) if weights_path is not None else path
    if not source.exists():
        raise CheckpointError("weights path does not exist", file=source)

    weights = _weights_from_path(source)
    readers = [_open_weight_file(f, allow_pickle) for f in weights.files]
    _check_weight_map(weights, {r.path: r for r in readers})
    config_path = root / "config.json"
    config = _read_json_object(config_path, "config.json") if config_path.is_file() else {}
    sidecars = _read_sidecars(root)
    declared_in = "config.json"
    beside = source if source.is_dir() else source.parent
    if weights_path is not None and beside.resolve() != root.resolve():
        # The replacement weights say how they are quantized; the base says which model it is.
        sidecars.update(_read_sidecars(beside))
        declared = beside / "config.json"
        if "quantization_config" not in config and declared.is_file():
            qc = _read_json_object(declared, "config.json").get("quantization_config")
            if qc:
                config, declared_in = {**config, "quantization_config": qc}, f"{declared} (beside the weights)"
    if "quantization_config" not in config:
        for reader in readers:
            qc = _metadata_quantization_config(reader)
            if qc:
                config, declared_in = {**config, "quantization_config": qc}, f"safetensors metadata of {reader.path}"
                break
    return CheckpointSource(root, weights, readers, config, sidecars, declared_in)


def _metadata_quantization_config(reader) -> dict | None:
    """A ``quantization_config`` JSON object stored in a safetensors file's ``__metadata__``."""
    text = reader.metadata.get("quantization_config")
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise CheckpointError(f"the quantization_config in the safetensors metadata is not valid JSON: {e}",
                              file=reader.path) from e
    if not isinstance(value, dict):
        raise CheckpointError("the quantization_config in the safetensors metadata is not a JSON object",
                              file=reader.path)
    return value


# The dtypes of unquantized tensors; the loader converts among them to the compute dtype.
UNQUANTIZED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linears_stored_unquantized(source: CheckpointSource, scale_suffixes: tuple[str, ...]) -> list[str]:
    """The layers a quantized checkpoint keeps in 16-bit: a 2-D floating ``weight`` with none of
    ``scale_suffixes`` (e.g. ``weight_scale``) beside it."""
    out = []
    for name, info in source.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2 and info.dtype in UNQUANTIZED_DTYPES:
            prefix = name[: -len(".weight")]
            if not any(f"{prefix}.{suffix}" in source.tensors for suffix in scale_suffixes):
                out.append(prefix)
    return sorted(out)
