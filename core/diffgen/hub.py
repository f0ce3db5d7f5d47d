"""Hugging Face repo IDs wherever diffgen takes a path.

A path that does not exist locally may name a repo instead: ``owner/name``, ``owner/name@rev``
(branch, tag or commit), ``owner/name[@rev]/path/in/repo``, or a ``https://huggingface.co/...``
URL (``/tree/``, ``/resolve/`` or ``/blob/<rev>/<path>``). Only the files a load needs are fetched,
into the standard hub cache (``HF_HOME``, ``HF_HUB_CACHE``): the JSON, text and tokenizer files of
each component, and of its weights only what :func:`~diffgen.checkpoint.select_weight_files`
picks from the repo's listing (an index and the shards its ``weight_map`` names; a ``*-mixed``
export rather than its full-precision sibling). With ``HF_HUB_OFFLINE=1``, or when the hub cannot
be reached, the listing is the cached snapshot of that revision and only cached files are used.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .checkpoint import INDEX_SUFFIX, PICKLE_SUFFIXES, select_weight_files
from .errors import CheckpointError, DiffgenError

log = logging.getLogger("diffgen")

__all__ = ["RepoSpec", "parse_repo_spec", "resolve_pipeline", "resolve_component", "resolve_weights",
           "resolve_transformer"]

Say = Callable[[str], None]

# The hub's own rule for owner and repo names: letters, digits, '-', '_', '.', not at either end,
# no '--' or '..', at most 96 characters.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
# A pull request's revision holds slashes, so it cannot end at the first '/' as others do.
_PR_REVISION = re.compile(r"refs/pr/\d+(?=/|$)")
_COMMIT = re.compile(r"[0-9a-f]{7,40}")
_URL_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".gguf", *PICKLE_SUFFIXES)
# Files a component folder needs besides its weights: configs, tokenizer vocabularies, templates.
_SIDE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
# Beside a weights-only override, the files a quantization format describes itself in.
_WEIGHTS_SIDECARS = re.compile(r"config\.json|hf_quant_config\.json|quant_model_description.*\.json")


@dataclass(frozen=True)
class RepoSpec:
    """A place in a Hugging Face model repo: ``path_in_repo`` is ``""`` for the repo's root."""

    repo_id: str
    revision: str = "main"
    path_in_repo: str = ""

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" + (f"/{self.path_in_repo}" if self.path_in_repo else "")


def _valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and "--" not in name and ".." not in name


def _valid_revision(revision: str) -> bool:
    # git's ref rules, the part that matters here: no spaces, no '..', none of ~^:?*[\ and no '@{'.
    return bool(revision) and not re.search(r"[\s~^:?*\[\\]|\.\.|@\{|^/|/$|//", revision)


def _valid_path(path: str) -> bool:
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _spec(owner: str, name: str, revision: str | None, path: str) -> RepoSpec | None:
    path = path.rstrip("/")
    # "out/model.safetensors" that does not exist is a mistyped path, not a repo of that name;
    # the hub reserves "datasets" and "spaces" for other kinds of repo.
    if name.lower().endswith(_FILE_SUFFIXES) or owner in ("datasets", "spaces"):
        return None
    if not (_valid_name(owner) and _valid_name(name)) or (path and not _valid_path(path)):
        return None
    if revision is not None and not _valid_revision(revision):
        return None
    return RepoSpec(f"{owner}/{name}", revision or "main", path)


def _parse_url(spec: str) -> RepoSpec | None:
    url = urlsplit(spec)
    if url.scheme not in ("http", "https") or url.netloc.lower() not in _URL_HOSTS:
        return None
    parts = url.path.strip("/").split("/")
    if len(parts) < 2:
        return None
    owner, name, rest = parts[0], parts[1], parts[2:]
    if not rest:
        return _spec(owner, name, None, "")
    if rest[0] not in ("tree", "resolve", "blob") or len(rest) < 2:
        return None
    revision = unquote(rest[1])  # the hub writes refs/pr/1 as refs%2Fpr%2F1
    return _spec(owner, name, revision, "/".join(unquote(p) for p in rest[2:]))


def parse_repo_spec(spec: str | os.PathLike) -> RepoSpec | None:
    """The repo place ``spec`` names, or None when it is not a repo spec (see the module docstring
    for the grammar). Says nothing about whether the repo exists; a spec starting with ``.``, ``/``
    or ``~``, or holding a backslash, is always a local path."""
    spec = os.fspath(spec)
    if not spec or spec[0] in "./~" or "\\" in spec:
        return None
    if "://" in spec:
        return _parse_url(spec)
    owner, _, rest = spec.partition("/")
    name, _, path = rest.partition("/")
    revision = None
    if "@" in name:
        name, _, after = name.partition("@")
        after = f"{after}/{path}" if path else after
        pr = _PR_REVISION.match(after)
        revision, _, path = (after[:pr.end()], "", after[pr.end() + 1:]) if pr else after.partition("/")
    return _spec(owner, name, revision, path)


def _local_or_repo(spec: str | os.PathLike) -> Path | RepoSpec:
    """A path that exists always wins; what is neither a path nor a repo spec stays a Path, so the
    caller's own "does not exist" error names it."""
    if os.path.exists(spec):
        return Path(spec)
    return parse_repo_spec(spec) or Path(spec)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", INDEX_SUFFIX, *PICKLE_SUFFIXES))


def _is_side_file(name: str) -> bool:
    base = posixpath.basename(name)
    if _is_weight_file(base):
        return False
    return base.endswith(_SIDE_SUFFIXES) or "tokenizer" in base.lower() or "processor" in base.lower()


def _in_folder(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


class _Repo:
    """One repo at one revision: its file listing, and fetching files from it into the hub cache."""

    def __init__(self, spec: RepoSpec, asked: str):
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.spec, self.asked = spec, asked
        self.storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=spec.repo_id, repo_type="model")
        # Read now, not at import: callers and tests set HF_HUB_OFFLINE after huggingface_hub loads.
        self.offline = bool(constants.HF_HUB_OFFLINE)
        self.why_cached = "HF_HUB_OFFLINE=1 forbids downloading it" if self.offline else ""
        self.revision = spec.revision      # becomes the commit once a download has resolved it
        self.snapshot: Path | None = None  # the local folder of this revision, once known
        self.fetched: set[str] = set()
        self.files = self._list()

    @property
    def cached(self) -> bool:
        return bool(self.why_cached)

    def describe(self) -> str:
        return f"repo {self.spec.repo_id} (revision {self.spec.revision})"

    def where(self, path: str) -> str:
        """``path`` in this repo, spelled as a spec the user could pass, for messages."""
        return str(RepoSpec(self.spec.repo_id, self.spec.revision, path))

    def _list(self) -> set[str]:
        if not self.offline:
            from huggingface_hub import HfApi

            try:
                return set(HfApi().list_repo_files(self.spec.repo_id, revision=self.spec.revision))
            except (ConnectionError, TimeoutError, *_http_errors("transport")) as exc:
                self.why_cached = f"the hub could not be reached to download it ({_first_line(exc)})"
            except _hub_errors() as exc:
                raise self.failure(exc) from exc
        self.snapshot = self._cached_snapshot()
        return {p.relative_to(self.snapshot).as_posix() for p in self.snapshot.rglob("*") if p.is_file()}

    def _cached_snapshot(self) -> Path:
        revision = self.spec.revision
        ref = self.storage / "refs" / revision
        snapshots = self.storage / "snapshots"
        if ref.is_file():
            commits = [ref.read_text().strip()]
        elif _COMMIT.fullmatch(revision) and snapshots.is_dir():
            commits = [p.name for p in snapshots.iterdir() if p.name.startswith(revision)]
        else:
            commits = []
        if len(commits) == 1 and (snapshots / commits[0]).is_dir():
            return snapshots / commits[0]
        if not self.storage.is_dir():
            where = (f"the Hugging Face repo {self.spec.repo_id} (revision {revision}) is not in the hub cache "
                     f"at {self.storage}")
        else:
            known = sorted(p.relative_to(self.storage / "refs").as_posix()
                           for p in (self.storage / "refs").rglob("*") if p.is_file())
            where = (f"revision {revision} of the Hugging Face repo {self.spec.repo_id} is not in the hub cache at "
                     f"{self.storage} (cached: {', '.join(known) or 'no named revisions'})")
        raise DiffgenError(f"{self.asked} is not a local path, and {where}; {self.why_cached}")

    def failure(self, exc: Exception) -> DiffgenError:
        """One line for whatever huggingface_hub raised, leading with the reason."""
        from huggingface_hub import errors

        repo = self.spec.repo_id
        if isinstance(exc, errors.GatedRepoError):
            why = (f"the Hugging Face repo {repo} is gated: accept its conditions at https://huggingface.co/{repo}, "
                   "then log in with `hf auth login` (or set HF_TOKEN)")
        elif isinstance(exc, errors.RepositoryNotFoundError):
            why = (f"{self.asked} is not a local path, and the Hugging Face repo {repo} does not exist or is private "
                   "(for a private repo, log in with `hf auth login` or set HF_TOKEN)")
        elif isinstance(exc, errors.RevisionNotFoundError):
            why = f"the Hugging Face repo {repo} has no revision {self.spec.revision} (a branch, tag or commit)"
        elif isinstance(exc, errors.LocalEntryNotFoundError):
            why = f"files of {self.describe()} are not in the hub cache and cannot be downloaded now"
        elif isinstance(exc, errors.EntryNotFoundError):
            why = f"{self.describe()} lacks a file it listed a moment ago"
        else:
            why = f"the Hugging Face hub failed a request for {self.describe()}"
        return DiffgenError(f"{why} ({_first_line(exc)})")

    def missing(self, what: str) -> str:
        """``what`` is not in the repo, or (served from the cache) not in the cached snapshot."""
        if self.cached:
            return f"{what} is not in the hub cache at {self.snapshot} for {self.describe()}; {self.why_cached}"
        return f"{self.describe()} has no {what}"

    def children(self, folder: str) -> list[str]:
        """The files directly in ``folder`` (``""``: the repo's root), as paths in the repo."""
        prefix = f"{folder}/" if folder else ""
        return sorted(f for f in self.files if f.startswith(prefix) and "/" not in f[len(prefix):])

    def is_folder(self, path: str) -> bool:
        return not path or any(f.startswith(path + "/") for f in self.files)

    def download(self, paths: Iterable[str]) -> Path:
        """Make ``paths`` (all in the listing) local; the local snapshot folder."""
        paths = sorted(set(paths) - self.fetched)
        if self.cached or not paths:
            return self.snapshot
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(self.spec.repo_id, revision=self.revision,
                                       allow_patterns=[glob_escape(p) for p in paths])
        except _hub_errors() as exc:
            raise self.failure(exc) from exc
        self.snapshot = Path(folder)
        self.fetched.update(paths)
        # Later downloads use the commit this one resolved, so every file comes from one snapshot.
        self.revision = self.snapshot.name
        return self.snapshot

    def fetch(self, wanted: list[str], what: str, say: Say | None) -> Path:
        """Download ``wanted`` and the shards its index files name; small files first, so the
        line ``say`` gets counts the shards before the large downloads begin."""
        small = [f for f in wanted if not _is_weight_file(f) or f.endswith(INDEX_SUFFIX)]
        folder = self.download(small) if small else None
        shards = [s for f in small if f.endswith(INDEX_SUFFIX) for s in self.shards(folder, f)]
        wanted = list(dict.fromkeys([*wanted, *shards]))
        say = say or log.info
        source = "the hub cache" if self.cached else "the hub"
        say(f"{what}: {len(wanted)} files of Hugging Face repo {self.spec.repo_id} "
            f"(revision {self.spec.revision}) from {source}")
        large = [f for f in wanted if f not in small]
        return self.download(large) if large else folder

    def shards(self, folder: Path, index: str) -> list[str]:
        """The shards ``index``'s ``weight_map`` names, as paths in the repo."""
        local = folder / index
        try:
            weight_map = json.loads(local.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"safetensors index is not a JSON object with a weight_map ({exc})",
                                  file=local) from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError("safetensors index has no 'weight_map' object", file=local)
        out = []
        for entry in dict.fromkeys(v for v in weight_map.values() if isinstance(v, str)):
            shard = posixpath.normpath(posixpath.join(posixpath.dirname(index), entry))
            if shard not in self.files:
                raise DiffgenError(self.missing(f"shard {shard} (named by {index})"))
            out.append(shard)
        return out


def _hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises for a refusal, a missing file or a network failure (its HTTP
    errors are OSErrors); anything else is a bug and keeps its traceback."""
    from huggingface_hub import errors

    return (OSError, *_http_errors("any"), errors.HFValidationError, errors.EntryNotFoundError)


def http_client():
    """huggingface_hub's HTTP library: httpx2 from huggingface_hub 2, httpx for 1.x, requests before."""
    for name in ("httpx2", "httpx", "requests"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _http_errors(kind: str) -> tuple[type[Exception], ...]:
    """``transport`` (could not connect) or ``any`` HTTP failure, in whichever library is in use."""
    client = http_client()
    names = {"transport": ("TransportError", "ConnectionError"), "any": ("HTTPError", "RequestException")}[kind]
    return tuple(getattr(client, n) for n in names if client is not None and hasattr(client, n))


def _component_files(repo: _Repo, folder: str, weights: bool = True) -> list[str]:
    """What a component folder needs: its side files, and (``weights``) the weight files the loader
    would pick."""
    names = repo.children(folder)
    wanted = [n for n in names if _is_side_file(n)]
    if weights and any(_is_weight_file(n) for n in names):
        chosen, _ = select_weight_files([posixpath.basename(n) for n in names], repo.where(folder))
        wanted += [_in_folder(folder, n) for n in chosen]
    return wanted


def _weights_files(repo: _Repo, path: str) -> list[str]:
    """A weights file (or index) with the sidecars beside it, or a folder's picked weights."""
    if path in repo.files:
        folder, chosen = posixpath.dirname(path), [path]
    elif repo.is_folder(path):
        folder, names = path, [posixpath.basename(n) for n in repo.children(path)]
        if not any(_is_weight_file(n) for n in names):
            raise DiffgenError(repo.missing(f"weight file (*.safetensors, index or pickle) in folder "
                                            f"{path or '/'}"))
        chosen = [_in_folder(folder, n) for n in select_weight_files(names, repo.where(path))[0]]
    else:
        raise DiffgenError(repo.missing(f"file or folder {path}"))
    sidecars = [f for f in repo.children(folder) if _WEIGHTS_SIDECARS.fullmatch(posixpath.basename(f))]
    return chosen + sidecars


class NotAPipelineError(DiffgenError):
    """The repo has no model_index.json (it may still be a single component)."""


def resolve_pipeline(spec: str | os.PathLike, *, skip: Iterable[str] = (), skip_weights: Iterable[str] = (),
                     only: Callable[[str, list], bool] | None = None, say: Say | None = None) -> Path:
    """The local folder of the diffusers pipeline ``spec`` names: a local path (returned as it is)
    or a Hugging Face repo spec, whose ``model_index.json`` and component folders are fetched into
    the hub cache. ``skip``: components the caller replaces with its own, not fetched at all;
    ``skip_weights``: components whose weights the caller brings (a weights-only override), of
    which only the config, text and tokenizer files are fetched; ``only(name, [library, class])``,
    when given, picks the components to fetch (``inspect`` takes the transformers). ``say`` gets one line per repo
    fetched. Raises DiffgenError, one line, for what cannot be had."""
    where = _local_or_repo(spec)
    if isinstance(where, Path):
        return where
    repo = _Repo(where, os.fspath(spec))
    base = where.path_in_repo
    model_index = _in_folder(base, "model_index.json")
    if model_index not in repo.files and repo.cached:
        raise DiffgenError(repo.missing(model_index))
    if model_index not in repo.files:
        raise NotAPipelineError(f"{repo.missing(model_index)}: not a diffusers pipeline; a pipeline repo holds "
                           "model_index.json and one folder per component")
    local = repo.download([model_index]) / model_index
    try:
        index = json.loads(local.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model_index.json is not valid JSON: {exc}", file=local) from exc
    skip, skip_weights = set(skip), set(skip_weights)
    components = [name for name, entry in (index.items() if isinstance(index, dict) else ())
                  if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
                  and entry[0] and entry[1] and name not in skip and (only is None or only(name, entry))]
    wanted = [model_index]
    for name in components:
        files = _component_files(repo, _in_folder(base, name), weights=name not in skip_weights)
        if not files:
            raise DiffgenError(repo.missing(f"folder {_in_folder(base, name)} for the component {name!r} "
                                            "that model_index.json names"))
        wanted += files
    return repo.fetch(wanted, f"pipeline {where.repo_id}", say) / base


def resolve_component(spec: str | os.PathLike, *, weights: bool = True, say: Say | None = None) -> Path:
    """The local folder of one pipeline component (``owner/name/transformer``, or a repo whose root
    is a component): its JSON, text and tokenizer files and the weight files the loader would pick;
    ``weights=False`` when the caller brings the weights from elsewhere. A spec naming a file is
    resolved as :func:`resolve_weights` does. Local paths win, as in :func:`resolve_pipeline`."""
    where = _local_or_repo(spec)
    if isinstance(where, Path):
        return where
    repo = _Repo(where, os.fspath(spec))
    path = where.path_in_repo
    if path in repo.files:
        return repo.fetch(_weights_files(repo, path), f"weights {path}", say) / path
    if not repo.is_folder(path):
        raise DiffgenError(repo.missing(f"file or folder {path}"))
    files = _component_files(repo, path, weights)
    if not files:
        raise DiffgenError(repo.missing(f"component files (config, tokenizer or weights) in folder {path or '/'}"))
    return repo.fetch(files, f"component {path or where.repo_id}", say) / path


def resolve_weights(spec: str | os.PathLike, *, say: Say | None = None) -> Path:
    """The local file or folder of a weights-only override (``--transformer-weights-path``): a
    weights file or ``*.safetensors.index.json`` in a repo (with the shards the index names), or a
    folder (the weights the loader would pick, a ``*-mixed`` export before its full-precision
    sibling); with either, the config.json, hf_quant_config.json and quant_model_description*.json
    beside them. Local paths win, as in :func:`resolve_pipeline`."""
    where = _local_or_repo(spec)
    if isinstance(where, Path):
        return where
    repo = _Repo(where, os.fspath(spec))
    path = where.path_in_repo
    return repo.fetch(_weights_files(repo, path), f"weights {path or where.repo_id}", say) / path


def resolve_transformer(spec: str | os.PathLike, *, say: Say | None = None) -> Path:
    """A transformer component given as itself or as the pipeline that holds it (its
    ``transformer/`` folder), locally or as a repo spec; for tools that take "the transformer"."""
    where = _local_or_repo(spec)
    if isinstance(where, Path):
        return where / "transformer" if (where / "transformer" / "config.json").is_file() else where
    try:
        return resolve_component(f"{os.fspath(spec).rstrip('/')}/transformer", say=say)
    except DiffgenError:
        return resolve_component(spec, say=say)
