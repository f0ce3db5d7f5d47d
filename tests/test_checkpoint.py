"""diffgen.checkpoint: resolving weight sets, reading headers only, streaming, hostile input.

Every fixture is built here in tmp_path: regular files with safetensors' own writer (so the
reference for round trips is an independent implementation), hostile ones from raw bytes.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import diffgen.safetensors_header as safetensors_header
from diffgen.checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointSource,
    SafetensorsFile,
    TensorNotFoundError,
    open_checkpoint,
)
from diffgen.errors import CheckpointError


class NotATensor:
    """A custom class; torch's weights_only unpickler must refuse to build it."""


def save(path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def raw_file(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a safetensors file by hand: ``header_len`` (if given) lies about the JSON length."""
    body = json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def write_index(path: Path, weight_map: dict[str, str]) -> Path:
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sharded_component(root: Path) -> Path:
    """A component dir with config.json and a 2-shard index, tensors interleaved across shards."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"_class_name": "TinyDiT", "num_layers": 2}))
    save(root / "model-00001-of-00002.safetensors",
         {"b.weight": torch.ones(4, 2), "a.weight": torch.zeros(3)})
    save(root / "model-00002-of-00002.safetensors",
         {"c.weight": torch.full((2,), 2.0), "d.weight": torch.arange(6.0).reshape(2, 3)})
    write_index(root / "model.safetensors.index.json", {
        "a.weight": "model-00001-of-00002.safetensors",
        "c.weight": "model-00002-of-00002.safetensors",
        "b.weight": "model-00001-of-00002.safetensors",
        "d.weight": "model-00002-of-00002.safetensors",
    })
    return root


@contextlib.contextmanager
def expect_error(match: str, *names: object):
    """The CheckpointError raised must match ``match`` and name every entry of ``names``."""
    with pytest.raises(CheckpointError, match=match) as info:
        yield info
    for name in names:
        assert str(name) in str(info.value), (name, str(info.value))


# ---- resolution -------------------------------------------------------------------------------

def test_single_file_with_config_and_metadata_beside_it(tmp_path):
    f = save(tmp_path / "w.safetensors", {"x": torch.randn(2, 3)}, metadata={"format": "pt"})
    (tmp_path / "config.json").write_text('{"_class_name": "TinyDiT"}')
    src = open_checkpoint(f)
    assert isinstance(src, CheckpointSource)
    assert src.root == tmp_path and src.files == [f]
    assert src.config == {"_class_name": "TinyDiT"}
    assert src.metadata == {f: {"format": "pt"}}
    info = src.info("x")
    assert (info.dtype, info.shape, info.numel, info.nbytes) == (torch.float32, (2, 3), 6, 24)
    assert info.end - info.start == 24 and src.file_of("x") == f
    assert torch.equal(src.read("x"), safetensors.torch.load_file(f)["x"])
    assert src.describe() == f"1 file {f} (single file)"


def test_index_is_authority_and_iteration_goes_shard_by_shard(tmp_path, monkeypatch):
    root = sharded_component(tmp_path / "transformer")
    (root / "stray.safetensors").write_bytes(b"not even safetensors")  # ignored: index rules
    src = open_checkpoint(root)
    assert [p.name for p in src.files] == ["model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors"]
    assert src.describe() == f"2 shards under {root} (model-0000X-of-00002.safetensors via index)"

    # Count open handles while iterating: only one shard may be open at any moment.
    real_open, state = builtins.open, {"open": 0, "peak": 0}

    class Tracked:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self.f.__enter__()

        def __exit__(self, *exc):
            state["open"] -= 1
            return self.f.__exit__(*exc)

    def tracking_open(*args, **kwargs):
        state["open"] += 1
        state["peak"] = max(state["peak"], state["open"])
        return Tracked(real_open(*args, **kwargs))

    monkeypatch.setattr(safetensors_header, "open", tracking_open, raising=False)
    got = list(src.iter_tensors())
    monkeypatch.undo()
    shard1 = list(SafetensorsFile(src.files[0]).tensors)
    shard2 = list(SafetensorsFile(src.files[1]).tensors)
    assert [n for n, _ in got] == shard1 + shard2
    assert sorted(shard1) == ["a.weight", "b.weight"]
    assert state == {"open": 0, "peak": 1}
    for name, tensor in got:
        assert torch.equal(tensor, src.read(name))
    # A subset keeps shard order, whatever order it was asked in.
    assert [n for n, _ in src.iter_tensors(["d.weight", "a.weight"])] == ["a.weight", "d.weight"]


def test_tensor_in_shard_but_not_in_weight_map_is_loaded(tmp_path):
    root = sharded_component(tmp_path)
    save(root / "model-00002-of-00002.safetensors",
         {"c.weight": torch.ones(2), "d.weight": torch.ones(2, 3), "e.extra": torch.ones(1)})
    assert "e.extra" in open_checkpoint(root).names()


def test_mixed_export_preferred_over_full_exports(tmp_path):
    save(tmp_path / "flux2-dev-nvfp4.safetensors", {"a": torch.ones(1)})
    save(tmp_path / "flux2-dev-nvfp4-fp8.safetensors", {"a": torch.ones(1)})
    mixed = save(tmp_path / "flux2-dev-nvfp4-mixed.safetensors", {"a": torch.zeros(1)})
    src = open_checkpoint(tmp_path)
    assert src.files == [mixed] and "mixed export" in src.describe()


def test_mixed_shards_form_one_set_and_two_mixed_sets_are_refused(tmp_path):
    save(tmp_path / "m.safetensors", {"a": torch.ones(1)})
    shards = [save(tmp_path / f"m-mixed-0000{i}-of-00002.safetensors", {f"t{i}": torch.ones(1)})
              for i in (1, 2)]
    assert open_checkpoint(tmp_path).files == shards
    save(tmp_path / "other-mixed.safetensors", {"a": torch.ones(1)})
    with expect_error("independent variants", tmp_path, "other-mixed.safetensors"):
        open_checkpoint(tmp_path)


def test_several_unindexed_variants_are_refused(tmp_path):
    save(tmp_path / "model-fp8.safetensors", {"a": torch.ones(1)})
    save(tmp_path / "model-bf16.safetensors", {"a": torch.ones(1)})
    with expect_error("independent variants.*weights_path", tmp_path, "model-fp8.safetensors"):
        open_checkpoint(tmp_path)


def test_unindexed_shard_set_is_accepted_in_shard_order(tmp_path):
    names = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (3, 1, 2)]
    for i, name in enumerate(names):
        save(tmp_path / name, {f"t{i}": torch.full((2,), float(i))})
    src = open_checkpoint(tmp_path)
    assert [p.name for p in src.files] == sorted(names)
    assert src.describe() == (f"3 shards under {tmp_path} (diffusion_pytorch_model-0000X-of-"
                              "00003.safetensors directory listing)")


def test_incomplete_shard_set_is_refused(tmp_path):
    save(tmp_path / "m-00001-of-00003.safetensors", {"a": torch.ones(1)})
    save(tmp_path / "m-00003-of-00003.safetensors", {"b": torch.ones(1)})
    with expect_error(r"incomplete.*missing shard numbers \[2\]", tmp_path):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("override", ["file", "dir", "index"])
def test_weights_path_overrides_weights_only(tmp_path, override):
    component = tmp_path / "transformer"
    component.mkdir()
    (component / "config.json").write_text('{"_class_name": "FromComponent"}')
    (component / "quant_model_description.json").write_text('{"x.weight": "W8A8"}')
    save(component / "diffusion_pytorch_model.safetensors", {"original": torch.ones(1)})
    quant = sharded_component(tmp_path / "quantized")
    (quant / "config.json").write_text('{"_class_name": "FromWeightsDir"}')
    weights = {"file": quant / "model-00002-of-00002.safetensors", "dir": quant,
               "index": quant / "model.safetensors.index.json"}[override]
    src = open_checkpoint(component, weights_path=weights)
    assert src.root == component
    assert src.config == {"_class_name": "FromComponent"}
    assert src.sidecars == {"quant_model_description.json": {"x.weight": "W8A8"}}
    assert "original" not in src.names() and "c.weight" in src.names()
    assert all(f.parent == quant for f in src.files)


def test_sidecars_read_and_index_and_config_excluded(tmp_path):
    root = sharded_component(tmp_path)
    (root / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8"}}')
    (root / "quant_model_description_w8a8.json").write_text('{"model_quant_type": "W8A8"}')
    src = open_checkpoint(root)
    assert src.sidecars == {
        "hf_quant_config.json": {"quantization": {"quant_algo": "FP8"}},
        "quant_model_description_w8a8.json": {"model_quant_type": "W8A8"},
    }


def test_hub_cache_symlinks_into_blobs_are_accepted(tmp_path):
    # huggingface_hub stores snapshot files as symlinks into the repo's blobs/ folder.
    repo = tmp_path / "models--org--name"
    blob = save(repo / "blobs" / "0123abcd", {"a": torch.ones(2)})
    snap = repo / "snapshots" / "rev" / "transformer"
    snap.mkdir(parents=True)
    (snap / "s-00001-of-00001.safetensors").symlink_to(os.path.relpath(blob, snap))
    write_index(snap / "s.safetensors.index.json", {"a": "s-00001-of-00001.safetensors"})
    assert torch.equal(open_checkpoint(snap).read("a"), torch.ones(2))


def test_missing_tensor_is_a_key_error_with_suggestions(tmp_path):
    src = open_checkpoint(save(tmp_path / "w.safetensors", {"blocks.0.weight": torch.ones(1)}))
    with pytest.raises(TensorNotFoundError, match="close names: blocks.0.weight") as e:
        src.info("blocks.0.wieght")
    assert isinstance(e.value, KeyError) and isinstance(e.value, CheckpointError)
    assert str(e.value).startswith("no tensor named")


# ---- lazy reading and bit-exact round trips ---------------------------------------------------

def test_open_reads_no_tensor_data(tmp_path):
    f = save(tmp_path / "w.safetensors", {"a": torch.ones(4, dtype=torch.float16),
                                          "b": torch.ones(2, 2)})
    src = open_checkpoint(f)
    info = src.info("a")
    raw = bytearray(f.read_bytes())
    raw[info.start:info.end] = b"\xff" * info.nbytes  # corrupt a's data after the header
    f.write_bytes(bytes(raw))
    reopened = open_checkpoint(f)  # header unchanged, so opening still works
    assert reopened.info("a").shape == (4,) and reopened.info("b").shape == (2, 2)
    assert as_bytes(reopened.read("a")) == b"\xff" * 8  # what is on disk now, read lazily
    assert torch.equal(reopened.read("b"), torch.ones(2, 2))


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    # Random bytes reinterpreted as ``dtype`` cover every bit pattern (NaNs, subnormals) for
    # floats; bool must stay 0/1 to be a valid bool.
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.uint8).bool()
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8).view(dtype).reshape(shape)


@pytest.mark.parametrize("code", sorted(SAFETENSORS_DTYPES))
def test_every_dtype_round_trips_bit_exactly(tmp_path, code):
    dtype = SAFETENSORS_DTYPES[code]
    torch.manual_seed(0)
    tensors = {"matrix": _sample(dtype, (3, 5)), "scalar": _sample(dtype, ()),
               "empty": _sample(dtype, (0, 4))}
    f = save(tmp_path / "w.safetensors", tensors)
    reference = safetensors.torch.load_file(f)
    src = open_checkpoint(f)
    for name, tensor in [*src.iter_tensors(), *((n, src.read(n)) for n in tensors)]:
        assert tensor.dtype == reference[name].dtype == dtype
        assert tensor.shape == reference[name].shape
        assert as_bytes(tensor) == as_bytes(reference[name])
    with safetensors.safe_open(f, "pt") as reference_reader:  # the writer used our code name
        assert reference_reader.get_slice("matrix").get_dtype() == code


def test_tensor_outlives_the_file(tmp_path):
    f = save(tmp_path / "w.safetensors", {"a": torch.arange(4, dtype=torch.bfloat16)})
    t = SafetensorsFile(f).read("a")
    f.unlink()
    assert torch.equal(t, torch.arange(4, dtype=torch.bfloat16))


# ---- hostile safetensors files ----------------------------------------------------------------

ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_file_shorter_than_8_bytes(tmp_path):
    f = tmp_path / "tiny.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    with expect_error("truncated", f):
        open_checkpoint(f)


def test_file_cut_in_the_middle_of_data(tmp_path):
    f = save(tmp_path / "w.safetensors", {"a": torch.ones(64)})
    f.write_bytes(f.read_bytes()[:-100])
    with expect_error("out of range", f, "'a'"):
        open_checkpoint(f)


def test_file_truncated_after_open_gives_short_read(tmp_path):
    f = save(tmp_path / "w.safetensors", {"a": torch.ones(64)})
    src = open_checkpoint(f)
    os.truncate(f, f.stat().st_size - 100)
    with expect_error("short read", f, "'a'"):
        src.read("a")
    with expect_error("short read", f, "'a'"):
        list(src.iter_tensors())


def test_header_length_beyond_file(tmp_path):
    f = raw_file(tmp_path / "w.safetensors", {"a": ENTRY}, b"\0" * 8, header_len=10_000)
    size = f.stat().st_size
    with expect_error(f"header length 10000 beyond the file size {size}", f):
        open_checkpoint(f)


def test_unreasonable_header_length(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_header, "MAX_HEADER_BYTES", 16)
    f = raw_file(tmp_path / "w.safetensors", {"a": ENTRY}, b"\0" * 8)
    with expect_error("unreasonable", f):
        open_checkpoint(f)


@pytest.mark.parametrize("body", [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]",
                                  b'{"a": 1, "a": 2}'])
def test_header_not_a_json_object(tmp_path, body):
    f = tmp_path / "w.safetensors"
    f.write_bytes(struct.pack("<Q", len(body)) + body)
    with expect_error("header", f):
        open_checkpoint(f)


def test_overlapping_offsets_name_both_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    f = raw_file(tmp_path / "w.safetensors", header, b"\0" * 12)
    with expect_error("overlap", f, "'a'", "'b'"):
        open_checkpoint(f)


@pytest.mark.parametrize("offsets", [[0, 16], [-4, 4], [8, 4]])
def test_out_of_range_offsets(tmp_path, offsets):
    header = {"a": {"dtype": "U8", "shape": [abs(offsets[1] - offsets[0])], "data_offsets": offsets}}
    f = raw_file(tmp_path / "w.safetensors", header, b"\0" * 8)
    with expect_error("out of range", f, "'a'"):
        open_checkpoint(f)


def test_size_mismatch(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    f = raw_file(tmp_path / "w.safetensors", header, b"\0" * 8)
    with expect_error("span 8 bytes but F32 \\[3\\] needs 12", f, "'a'"):
        open_checkpoint(f)


def test_unknown_dtype(tmp_path):
    header = {"a": {"dtype": "F7_WEIRD", "shape": [8], "data_offsets": [0, 8]}}
    f = raw_file(tmp_path / "w.safetensors", header, b"\0" * 8)
    with expect_error("unknown dtype 'F7_WEIRD'", f, "'a'"):
        open_checkpoint(f)


def test_entry_missing_fields(tmp_path):
    f = raw_file(tmp_path / "w.safetensors", {"a": {"dtype": "F32"}}, b"")
    with expect_error("lacks shape, data_offsets", f, "'a'"):
        open_checkpoint(f)


# ---- hostile indexes, configs and shard sets --------------------------------------------------

def _index_dir(tmp_path: Path, entry: str) -> tuple[Path, Path]:
    inside = tmp_path / "ckpt"
    save(inside / "ok.safetensors", {"a": torch.ones(1)})
    index = write_index(inside / "m.safetensors.index.json", {"a": "ok.safetensors", "b": entry})
    return inside, index


def test_index_naming_parent_directory_escape(tmp_path):
    save(tmp_path / "outside.safetensors", {"b": torch.ones(1)})
    inside, index = _index_dir(tmp_path, "../outside.safetensors")
    with expect_error("climbs out", index, "../outside.safetensors"):
        open_checkpoint(inside)


def test_index_naming_absolute_path(tmp_path):
    target = save(tmp_path / "outside.safetensors", {"b": torch.ones(1)})
    inside, index = _index_dir(tmp_path, str(target))
    with expect_error("absolute path", index, str(target)):
        open_checkpoint(index)


def test_index_naming_symlink_pointing_outside(tmp_path):
    target = save(tmp_path / "secret" / "outside.safetensors", {"b": torch.ones(1)})
    inside, index = _index_dir(tmp_path, "link.safetensors")
    (inside / "link.safetensors").symlink_to(target)
    with expect_error("resolves outside", index, "link.safetensors"):
        open_checkpoint(inside)


def test_index_with_missing_shard(tmp_path):
    inside, index = _index_dir(tmp_path, "gone-00002-of-00002.safetensors")
    with expect_error("missing", "gone-00002-of-00002.safetensors", index):
        open_checkpoint(inside)


def test_index_tensor_absent_from_its_shard(tmp_path):
    inside, index = _index_dir(tmp_path, "ok.safetensors")  # "b" is not in ok.safetensors
    with expect_error("header does not have it", "ok.safetensors", "'b'"):
        open_checkpoint(inside)


@pytest.mark.parametrize("text", ["{oops", '{"weight_map": ["a"]}', "[]"])
def test_index_not_json_or_without_weight_map(tmp_path, text):
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(text)
    with expect_error("JSON|weight_map", index):
        open_checkpoint(tmp_path)


def test_several_index_files_are_refused(tmp_path):
    root = sharded_component(tmp_path)
    write_index(root / "other.safetensors.index.json", {"a.weight": "x.safetensors"})
    with expect_error("several safetensors index", "model.safetensors.index.json",
                      "other.safetensors.index.json"):
        open_checkpoint(root)


@pytest.mark.parametrize("name", ["config.json", "hf_quant_config.json"])
@pytest.mark.parametrize("text", ["{broken", "[1, 2]"])
def test_config_or_sidecar_not_a_json_object(tmp_path, name, text):
    save(tmp_path / "w.safetensors", {"a": torch.ones(1)})
    (tmp_path / name).write_text(text)
    with expect_error("JSON", tmp_path / name):
        open_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards_names_both_files(tmp_path):
    one = save(tmp_path / "m-00001-of-00002.safetensors", {"a": torch.ones(1)})
    two = save(tmp_path / "m-00002-of-00002.safetensors", {"a": torch.zeros(1)})
    with expect_error("two weight files", one, two, "'a'"):
        open_checkpoint(tmp_path)


def test_no_weights_names_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with expect_error("no weights found", tmp_path):
        open_checkpoint(tmp_path)


def test_unsupported_weight_file_type(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with expect_error("unsupported weight file type '.gguf'", f):
        open_checkpoint(f)


# ---- pickles ----------------------------------------------------------------------------------

def test_pickle_refused_without_allow_pickle(tmp_path):
    f = tmp_path / "backbone.pt"
    torch.save({"a": torch.ones(2)}, f)
    with expect_error("pickle checkpoints can run code; pass allow_pickle=True", f):
        open_checkpoint(f)
    with expect_error("allow_pickle", tmp_path / "backbone.pt"):
        open_checkpoint(tmp_path)  # found by the directory listing, refused the same way


def test_pickle_loaded_with_allow_pickle_and_state_dict_unwrapped(tmp_path):
    f = tmp_path / "model.ckpt"
    weights = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save({"state_dict": weights, "epoch": 3}, f)
    src = open_checkpoint(f, allow_pickle=True)
    assert src.names() == ["a", "b"] and src.info("a").shape == (3, 2)
    assert src.info("b").nbytes == 4
    for name, tensor in src.iter_tensors():
        assert torch.equal(tensor, weights[name]) and tensor.is_contiguous()
    assert src.describe() == f"1 file {f} (pickle)"


def test_pickle_with_custom_object_is_refused_by_weights_only(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"a": torch.ones(2), "payload": NotATensor()}, f)
    with expect_error("weights_only=True.*NotATensor", f):
        open_checkpoint(f, allow_pickle=True)


def test_a_lone_first_shard_and_an_absurd_shard_total_are_refused_quickly(tmp_path):
    from safetensors.torch import save_file

    lone = tmp_path / "lone"
    lone.mkdir()
    save_file({"a": torch.zeros(2)}, lone / "model-00001-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=r"1 of 00003 shards present \(missing shard numbers \[2, 3\]"):
        open_checkpoint(lone)
    huge = tmp_path / "huge"
    huge.mkdir()
    save_file({"a": torch.zeros(2)}, huge / "m-00001-of-99999999999999999999.safetensors")
    save_file({"b": torch.zeros(2)}, huge / "m-00002-of-99999999999999999999.safetensors")
    with pytest.raises(CheckpointError, match="missing shard numbers most"):
        open_checkpoint(huge)


def test_a_fifo_as_the_weights_file_is_refused_not_read(tmp_path):
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="neither a regular file nor a directory"):
        open_checkpoint(tmp_path, weights_path=fifo)


def _raw_safetensors(path, header: dict, data: bytes, header_len_delta: int = 0, padding: int = 0) -> None:
    text = json.dumps(header).encode() + b" " * padding
    path.write_bytes(struct.pack("<Q", len(text) + header_len_delta) + text + data)


def test_offsets_must_tile_the_data_region_exactly(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    good = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    _raw_safetensors(tmp_path / "good.safetensors", good, data)
    assert set(SafetensorsFile(tmp_path / "good.safetensors").tensors) == {"a", "b"}
    shifted = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [1, 17]},
               "b": {"dtype": "F32", "shape": [3], "data_offsets": [17, 29]}}
    _raw_safetensors(tmp_path / "shifted.safetensors", shifted, data)
    with pytest.raises(CheckpointError, match=r"leave bytes \[0, 1\) of the data region to no tensor"):
        SafetensorsFile(tmp_path / "shifted.safetensors")
    # the header length pointing 4 bytes into the header's padding: every tensor would read shifted bytes
    _raw_safetensors(tmp_path / "into-padding.safetensors", good, data, header_len_delta=-4, padding=8)
    with pytest.raises(CheckpointError, match="the data region holds 36 bytes but the tensors cover 32"):
        SafetensorsFile(tmp_path / "into-padding.safetensors")


def test_an_absurd_dimension_is_refused_even_beside_a_zero(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [0, 2 ** 70], "data_offsets": [0, 0]}}
    _raw_safetensors(tmp_path / "huge.safetensors", header, b"")
    with pytest.raises(CheckpointError, match=r"shape \[0, 1180591620717411303424\] is not a list of non-negative"):
        SafetensorsFile(tmp_path / "huge.safetensors")


def test_a_sparse_file_declaring_more_than_the_machine_holds_is_refused_before_allocating(tmp_path):
    n = 1 << 36  # 256 GiB of float32: more than any machine running this suite has free
    path = tmp_path / "sparse.safetensors"
    _raw_safetensors(path, {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}, b"")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 4 * n)  # holes: no disk is used
    reader = SafetensorsFile(path)
    with pytest.raises(CheckpointError, match="tensor needs 274877906944 bytes and this machine has"):
        reader.read("w")


@pytest.mark.parametrize("entry, says", [
    ("a\x00b.safetensors", "holds a NUL byte or a name longer"),
    ("x" * 300 + ".safetensors", "holds a NUL byte or a name longer"),
    ("loop.safetensors", "cannot be resolved|is a link that resolves outside|is missing"),
])
def test_index_entries_the_os_would_choke_on_are_one_checkpoint_error(tmp_path, entry, says):
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")  # a link to itself
    index = write_index(tmp_path / "model.safetensors.index.json", {"w": entry})
    with pytest.raises(CheckpointError, match=says):
        open_checkpoint(index)


def test_a_hub_cache_whose_blobs_folder_is_a_link_vouches_for_nothing(tmp_path):
    from safetensors.torch import save_file

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"w": torch.zeros(2)}, outside / "secret.safetensors")
    repo = tmp_path / "models--o--n"
    repo.mkdir()
    (repo / "blobs").symlink_to(tmp_path)  # "blobs" itself points at a parent of everything
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(outside / "secret.safetensors")
    index = write_index(snapshot / "model.safetensors.index.json", {"w": "model.safetensors"})
    with pytest.raises(CheckpointError, match="is a link that resolves outside"):
        open_checkpoint(index)
