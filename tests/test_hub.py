"""Hugging Face repo IDs in place of paths, against a hub cache written here in the standard layout.

Nothing reaches the network: offline tests read the cache with HF_HUB_OFFLINE=1, and the "online"
ones replace huggingface_hub's two calls (listing, snapshot_download) with a fake hub that records
which files were asked for and writes them into the same cache layout.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load, save

import diffgen
from diffgen.checkpoint import open_checkpoint
from diffgen.errors import DiffgenError
from diffgen.hub import RepoSpec, http_client, parse_repo_spec, resolve_component, resolve_pipeline, resolve_weights
from diffgen.tiny.pipelines import build_tiny_pipeline
from diffgen.tiny.transformers import save_tiny_transformer

# ---------------------------------------------------------------------------------------------
# A hub cache in huggingface_hub's layout: models--owner--name/{blobs, snapshots/<commit>, refs}


def _commit(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def cache_files(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """Write ``files`` into the snapshot ``commit`` of ``repo_id``; ``ref`` (a branch or tag) points at it."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for rel, data in files.items():
        # The hub names a blob by its git or LFS hash; any name unique to the content serves here.
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # ../../blobs/<sha>, deeper for subfolders
    snapshot.mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # the hub writes it without a newline
    return snapshot


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tensors(seed: int, *names: str) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({n: torch.randn(4, 4, generator=g) for n in names})


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub and diffgen use, offline."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for var, value in (("HF_HOME", home), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, str(value))
    # huggingface_hub read the environment when it was imported; its constants are what it uses.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


class FakeHub:
    """The two huggingface_hub calls diffgen makes online, served from ``repos`` into the cache."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.repos: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}  # (repo, rev) -> (commit, files)
        self.fetched: list[str] = []
        self.failure: Exception | None = None

    def add(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        commit = _commit(repo_id, revision, "remote")
        self.repos[(repo_id, revision)] = self.repos[(repo_id, commit)] = (commit, files)
        return commit

    def list_repo_files(self, repo_id, *, revision=None, **_):
        if self.failure is not None:
            raise self.failure
        return sorted(self.repos[(repo_id, revision or "main")][1])

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **_):
        commit, files = self.repos[(repo_id, revision)]
        chosen = {p: d for p, d in files.items() if any(fnmatch.fnmatchcase(p, pat) for pat in allow_patterns)}
        self.fetched += sorted(chosen)
        return str(cache_files(self.cache, repo_id, commit, chosen, ref=None if revision == commit else revision))


@pytest.fixture
def fake_hub(hub_cache, monkeypatch):
    hub = FakeHub(hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda api, *a, **kw: hub.list_repo_files(*a, **kw))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


# ---------------------------------------------------------------------------------------------
# The spec grammar


@pytest.mark.parametrize("spec, repo_id, revision, path", [
    ("owner/name", "owner/name", "main", ""),
    ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev", "main", ""),
    ("owner/name@v1.0", "owner/name", "v1.0", ""),
    ("owner/name@0123abc", "owner/name", "0123abc", ""),
    ("owner/name/transformer", "owner/name", "main", "transformer"),
    ("owner/name/transformer/", "owner/name", "main", "transformer"),
    ("owner/name@dev/sub/x.safetensors", "owner/name", "dev", "sub/x.safetensors"),
    ("owner/name@refs/pr/12/transformer", "owner/name", "refs/pr/12", "transformer"),
    ("https://huggingface.co/owner/name", "owner/name", "main", ""),
    ("https://huggingface.co/owner/name/", "owner/name", "main", ""),
    ("https://hf.co/owner/name/tree/v2/transformer", "owner/name", "v2", "transformer"),
    ("https://huggingface.co/owner/name/resolve/main/a/b.safetensors?download=true", "owner/name", "main",
     "a/b.safetensors"),
    ("https://huggingface.co/owner/name/blob/refs%2Fpr%2F3/a.safetensors.index.json", "owner/name", "refs/pr/3",
     "a.safetensors.index.json"),
])
def test_repo_specs_parse(spec, repo_id, revision, path):
    assert parse_repo_spec(spec) == RepoSpec(repo_id, revision, path)


@pytest.mark.parametrize("spec", [
    "", "name", "./owner/name", "/owner/name", "~/owner/name", "owner\\name", "C:/models/flux",
    "owner/", "/name", "owner//name", "owner/name@", "owner/name@a..b", "owner/name@has space",
    "owner/name/../x", "owner/name/./x", "owner/name//x", "-owner/name", "owner/name-", "owner/na--me",
    "owner/na..me", "out/model.safetensors", "transformer/config.json", "datasets/owner",
    "https://example.com/owner/name", "https://huggingface.co/owner", "ftp://huggingface.co/owner/name",
    "https://huggingface.co/owner/name/commits/main", "https://huggingface.co/owner/name/tree",
])
def test_non_repo_specs_do_not_parse(spec):
    assert parse_repo_spec(spec) is None


def test_local_path_of_the_same_spelling_wins(hub_cache, tmp_path, monkeypatch):
    cache_files(hub_cache, "tiny/flux", _commit("a"), {"model_index.json": b"{}"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny" / "flux").mkdir(parents=True)
    for resolve in (resolve_pipeline, resolve_component, resolve_weights):
        assert resolve("tiny/flux") == Path("tiny/flux")
    # Neither a path nor a repo spec: handed back for the caller's own "does not exist" error.
    assert resolve_weights("out/missing.safetensors") == Path("out/missing.safetensors")
    assert resolve_component("./tiny/other") == Path("./tiny/other")


def test_importing_the_module_leaves_huggingface_hub_unloaded():
    code = "import sys, diffgen.hub; sys.exit('huggingface_hub' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------
# Which files are fetched (fake hub: the requests are recorded)

FULL = "transformer/diffusion_pytorch_model.safetensors"
MIXED = "transformer/flux-nvfp4-mixed.safetensors"


def _nvfp4_repo() -> dict[str, bytes]:
    return {
        "README.md": b"# card", "flux1-dev.safetensors": tensors(9, "w"),  # root files: no component's
        "model_index.json": json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"],
                                        "vae": ["diffusers", "AutoencoderKL"], "tokenizer": ["transformers", "T"],
                                        "scheduler": ["diffusers", "S"], "image_encoder": [None, None]}).encode(),
        "transformer/config.json": b"{}", "transformer/hf_quant_config.json": b"{}",
        FULL: tensors(0, "w"), MIXED: tensors(1, "w"),
        "vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": tensors(2, "w"),
        "tokenizer/tokenizer.json": b"{}", "tokenizer/merges.txt": b"", "tokenizer/spiece.model": b"sp",
        "tokenizer/chat_template.jinja": b"", "scheduler/scheduler_config.json": b"{}",
    }


def test_weights_from_a_folder_take_the_mixed_export_and_its_sidecars(fake_hub):
    fake_hub.add("nv/flux-nvfp4", _nvfp4_repo())
    lines = []
    folder = resolve_weights("nv/flux-nvfp4/transformer", say=lines.append)
    assert sorted(fake_hub.fetched) == sorted([MIXED, "transformer/config.json", "transformer/hf_quant_config.json"])
    assert folder.name == "transformer" and folder.parent.name == _commit("nv/flux-nvfp4", "main", "remote")
    assert len(lines) == 1 and "nv/flux-nvfp4" in lines[0] and "revision main" in lines[0] and "3 files" in lines[0]


def test_pipeline_fetches_what_each_component_needs_and_skips_replaced_ones(fake_hub):
    fake_hub.add("nv/flux-nvfp4", _nvfp4_repo())
    lines = []
    root = resolve_pipeline("nv/flux-nvfp4", skip=("vae",), say=lines.append)
    assert sorted(fake_hub.fetched) == sorted([
        "model_index.json", MIXED, "transformer/config.json", "transformer/hf_quant_config.json",
        "tokenizer/tokenizer.json", "tokenizer/merges.txt", "tokenizer/spiece.model",
        "tokenizer/chat_template.jinja", "scheduler/scheduler_config.json"])
    assert (root / "model_index.json").is_file() and len(lines) == 1


def test_weights_override_leaves_the_components_own_weights_unfetched(fake_hub):
    fake_hub.add("nv/flux-nvfp4", _nvfp4_repo())
    resolve_pipeline("nv/flux-nvfp4", skip_weights=["transformer"])
    assert "transformer/config.json" in fake_hub.fetched
    assert [f for f in fake_hub.fetched if f.endswith(".safetensors")] == ["vae/diffusion_pytorch_model.safetensors"]
    fake_hub.fetched.clear()
    assert resolve_component("nv/flux-nvfp4/transformer", weights=False).name == "transformer"
    assert not [f for f in fake_hub.fetched if f.endswith(".safetensors")]


def _index_repo() -> dict[str, bytes]:
    shards = {"transformer/diffusion_pytorch_model-00001-of-00002.safetensors": tensors(3, "a"),
              "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": tensors(4, "b")}
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    return {**shards, "transformer/config.json": b"{}", "transformer/old.safetensors": tensors(5, "a", "b"),
            "transformer/diffusion_pytorch_model.safetensors.index.json": json.dumps(index).encode()}


@pytest.mark.parametrize("spec", ["o/sharded/transformer",
                                  "o/sharded/transformer/diffusion_pytorch_model.safetensors.index.json"])
def test_index_brings_exactly_the_shards_it_names(fake_hub, spec):
    remote = _index_repo()
    fake_hub.add("o/sharded", remote)
    local = resolve_weights(spec)
    shards = sorted(p for p in remote if "-of-" in p)
    assert sorted(fake_hub.fetched) == sorted([*shards, "transformer/config.json",
                                               "transformer/diffusion_pytorch_model.safetensors.index.json"])
    source = open_checkpoint(local)
    assert [f.name for f in source.files] == [Path(s).name for s in shards]
    assert torch.equal(source.read("a"), load(remote[shards[0]])["a"])
    assert torch.equal(source.read("b"), load(remote[shards[1]])["b"])


def test_unreachable_hub_falls_back_to_the_cache(fake_hub, hub_cache):
    commit = fake_hub.add("nv/flux-nvfp4", _nvfp4_repo())
    resolve_weights("nv/flux-nvfp4/transformer")
    fake_hub.failure = http_client().ConnectError("network is unreachable")
    fake_hub.fetched.clear()
    assert resolve_weights("nv/flux-nvfp4/transformer") == hub_cache / "models--nv--flux-nvfp4" / "snapshots" / \
        commit / "transformer"
    assert fake_hub.fetched == []
    with pytest.raises(DiffgenError, match=r"^nv/other is not a local path, .*not in the hub cache.*could not "
                                           r"be reached.*ConnectError"):
        resolve_weights("nv/other")


def _http_error(cls, status):
    request = http_client().Request("GET", "https://huggingface.co/api/models/o/n/tree/main")
    return cls("refused", response=http_client().Response(status, request=request))


@pytest.mark.parametrize("error, message", [
    (_http_error(GatedRepoError, 403), r"^the Hugging Face repo o/n is gated: .*`hf auth login`"),
    (_http_error(RepositoryNotFoundError, 404), r"^o/n is not a local path, and the Hugging Face repo o/n does not "
                                                r"exist or is private"),
    (_http_error(RevisionNotFoundError, 404), r"^the Hugging Face repo o/n has no revision main"),
])
def test_hub_refusals_are_one_line(fake_hub, error, message):
    fake_hub.failure = error
    with pytest.raises(DiffgenError, match=message) as info:
        resolve_pipeline("o/n")
    assert "\n" not in str(info.value)


def test_repo_without_model_index_is_not_a_pipeline(fake_hub):
    fake_hub.add("o/bare", {"config.json": b"{}", "model.safetensors": tensors(0, "w")})
    with pytest.raises(DiffgenError, match=r"^repo o/bare \(revision main\) has no model_index.json: not a diffusers"):
        resolve_pipeline("o/bare")
    assert resolve_component("o/bare").is_dir()  # a repo whose root is a component
    assert sorted(fake_hub.fetched) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------------------------------------
# The offline cache: revisions, what is missing


def test_revision_picks_its_own_snapshot(hub_cache):
    main, v1 = _commit("main"), _commit("v1")
    cache_files(hub_cache, "o/n", main, {"transformer/config.json": b'{"rev": "main"}', FULL: tensors(0, "w")})
    cache_files(hub_cache, "o/n", v1, {"transformer/config.json": b'{"rev": "v1"}', FULL: tensors(1, "w")}, ref="v1")
    for spec, commit in [("o/n/transformer", main), ("o/n@v1/transformer", v1), (f"o/n@{v1}/transformer", v1),
                         (f"o/n@{v1[:10]}/transformer", v1),
                         ("https://huggingface.co/o/n/tree/v1/transformer", v1)]:
        folder = resolve_component(spec)
        assert folder.parent.name == commit, spec
        assert json.loads((folder / "config.json").read_text())["rev"] == ("v1" if commit == v1 else "main")


def test_missing_things_are_one_line_errors_naming_the_repo(hub_cache):
    index = {"weight_map": {"a": "w-00001-of-00002.safetensors", "b": "w-00002-of-00002.safetensors"}}
    cache_files(hub_cache, "o/n", _commit("main"), {
        "transformer/w.safetensors.index.json": json.dumps(index).encode(),
        "transformer/w-00001-of-00002.safetensors": tensors(0, "a")})
    cases = [
        ("o/missing", r"^o/missing is not a local path, and the Hugging Face repo o/missing \(revision main\) is not "
                      r"in the hub cache at .*models--o--missing; HF_HUB_OFFLINE=1 forbids downloading it$"),
        ("o/n@v9", r"^o/n@v9 is not a local path, and revision v9 of the Hugging Face repo o/n is not in the hub "
                   r"cache at .*\(cached: main\); HF_HUB_OFFLINE=1"),
        ("o/n/vae", r"^file or folder vae is not in the hub cache at .* for repo o/n \(revision main\)"),
        ("o/n/transformer", r"^shard transformer/w-00002-of-00002.safetensors \(named by transformer/w.safetensors"
                            r".index.json\) is not in the hub cache"),
    ]
    for spec, message in cases:
        with pytest.raises(DiffgenError, match=message) as info:
            resolve_weights(spec)
        assert "\n" not in str(info.value)
    with pytest.raises(DiffgenError, match=r"^model_index.json is not in the hub cache .* repo o/n "):
        resolve_pipeline("o/n")


def test_skipped_components_need_not_be_cached(hub_cache):
    files = {k: v for k, v in _nvfp4_repo().items() if not k.startswith("transformer/")}
    cache_files(hub_cache, "nv/flux-nvfp4", _commit("main"), files)
    with pytest.raises(DiffgenError, match=r"^folder transformer for the component 'transformer' .* not in the hub"):
        resolve_pipeline("nv/flux-nvfp4")
    assert resolve_pipeline("nv/flux-nvfp4", skip=["transformer"]).name == _commit("main")


def test_offline_folder_with_both_exports_loads_the_mixed_one(hub_cache):
    cache_files(hub_cache, "nv/flux-nvfp4", _commit("main"), _nvfp4_repo())
    assert [f.name for f in open_checkpoint(resolve_weights("nv/flux-nvfp4/transformer")).files] == \
        [Path(MIXED).name]


# ---------------------------------------------------------------------------------------------
# End to end: a tiny FLUX pipeline served from the cache loads through the public API


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-flux")
    return build_tiny_pipeline("flux1", root / "pipe", seed=0), \
        save_tiny_transformer("flux1", root / "transformer", seed=5, dtype=torch.float32)


def test_cached_pipeline_repo_loads(hub_cache, tiny_flux):
    pipe_dir, other_transformer = tiny_flux
    cache_files(hub_cache, "tiny/flux", _commit("main"), files_of(pipe_dir))
    cache_files(hub_cache, "tiny/flux-transformer", _commit("t"), files_of(other_transformer))
    resolved = resolve_pipeline("tiny/flux")
    assert files_of(resolved) == files_of(pipe_dir)

    pipe = diffgen.load_pipeline("tiny/flux", device="cpu", dtype=torch.float32)
    local = diffgen.load_pipeline(pipe_dir, device="cpu", dtype=torch.float32)
    for name, tensor in local.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], tensor), name

    replaced = diffgen.load_pipeline("tiny/flux", transformer_path="tiny/flux-transformer", device="cpu",
                                     dtype=torch.float32)
    theirs = diffgen.load_transformer(other_transformer, device="cpu", dtype=torch.float32).state_dict()
    assert all(torch.equal(t, theirs[n]) for n, t in replaced.transformer.state_dict().items())
    assert diffgen.inspect("tiny/flux/transformer", device="cpu")["model_class"] == "FluxTransformer2DModel"


def test_cli_takes_repo_ids_for_the_model_and_the_weights(hub_cache, tiny_flux, tmp_path, capsys, caplog):
    from safetensors.torch import load_file, save_file

    from diffgen.cli import main

    pipe_dir, _ = tiny_flux
    cache_files(hub_cache, "tiny/flux", _commit("main"), files_of(pipe_dir))
    # A weights-only repo in SGLang's style: one FP8 file (no config) and its 16-bit sibling.
    weights = load_file(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    fp8 = {}
    for name, w in weights.items():
        if name.endswith(".weight") and w.dim() == 2 and "blocks." in name:
            scale = w.abs().amax().float() / 448
            fp8[name], fp8[name[:-len("weight")] + "weight_scale"] = (w.float() / scale).to(torch.float8_e4m3fn), scale
        else:
            fp8[name] = w
    save_file(fp8, tmp_path / "fp8.safetensors")
    cache_files(hub_cache, "tiny/flux-fp8", _commit("fp8"), {
        "flux-fp8-mixed.safetensors": (tmp_path / "fp8.safetensors").read_bytes(),
        "flux-bf16.safetensors": (pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()})
    perf = tmp_path / "perf.json"
    assert main(["generate", "--model-path", "tiny/flux", "--transformer-weights-path", "tiny/flux-fp8",
                 "--prompt", "x", "--num-inference-steps", "1", "--height", "64", "--width", "64",
                 "--no-save-output", "--perf-json", str(perf)]) == 0
    capsys.readouterr()
    assert "pipeline tiny/flux: " in caplog.text  # the progress line the CLI prints, one per repo
    assert "of Hugging Face repo tiny/flux (revision main) from the hub cache" in caplog.text
    assert "weights tiny/flux-fp8: 1 files of Hugging Face repo tiny/flux-fp8" in caplog.text  # the -mixed one
    methods = json.loads(perf.read_text())["methods"]["transformer"]
    assert "fp8" in methods["transformer_blocks.*.attn.to_q"]  # the -mixed file, recognised from its tensors
    assert main(["inspect", "tiny/flux", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["transformer"]["model_class"] == "FluxTransformer2DModel"
    assert main(["inspect", "tiny/nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny/nosuch" in err[0]


def test_tools_find_the_transformer_of_a_pipeline_or_take_a_component(hub_cache, tiny_flux):
    from diffgen.hub import resolve_transformer

    pipe_dir, other_transformer = tiny_flux
    cache_files(hub_cache, "tiny/flux", _commit("main"), files_of(pipe_dir))
    cache_files(hub_cache, "tiny/flux-transformer", _commit("t"), files_of(other_transformer))
    assert files_of(resolve_transformer("tiny/flux")) == files_of(pipe_dir / "transformer")
    assert files_of(resolve_transformer("tiny/flux-transformer")) == files_of(other_transformer)
    assert resolve_transformer(pipe_dir) == pipe_dir / "transformer"
    assert resolve_transformer(other_transformer) == other_transformer
