"""Mutations of the directory: index entries, shard names, FIFOs, links, missing and extra files."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from .case import BENIGN, EITHER, ERROR, Mutation, mutator, weight_files

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _index(case: Path) -> dict | None:
    path = case / INDEX
    return json.loads(path.read_text()) if path.is_file() else None


@mutator("index")
def index_entry(rng: random.Random, case: Path, seed: str) -> Mutation:
    """An index entry that is hostile (../, absolute, NUL, 300 characters, a link loop, a FIFO, a
    device) or wrong (a missing shard, another shard, not a string)."""
    index = _index(case)
    if index is None:
        return layout(rng, case, seed)
    weight_map = index["weight_map"]
    tensor = rng.choice(sorted(weight_map))
    choice = rng.choice(["dotdot", "absolute", "nul", "long", "loop", "fifo", "device", "missing", "other-shard",
                         "not-str", "dir", "backslash", "empty", "link-out", "link-in", "dot-slash", "not-st"])
    expect, value = ERROR, None
    if choice == "dotdot":
        value = "../" + weight_map[tensor]
        shutil.copy(case / weight_map[tensor], case.parent / weight_map[tensor])
    elif choice == "absolute":
        value = str((case / weight_map[tensor]).absolute())
    elif choice == "nul":
        value = "a\0b.safetensors"
    elif choice == "long":
        value = "x" * 300 + ".safetensors"
    elif choice == "loop":
        os.symlink("loop-b.safetensors", case / "loop-a.safetensors")
        os.symlink("loop-a.safetensors", case / "loop-b.safetensors")
        value = "loop-a.safetensors"
    elif choice == "fifo":
        os.mkfifo(case / "fifo.safetensors")
        value = "fifo.safetensors"
    elif choice == "device":
        os.symlink("/dev/zero", case / "zero.safetensors")
        value = "zero.safetensors"
    elif choice == "missing":
        value = "nowhere-00009-of-00009.safetensors"
    elif choice == "other-shard":
        value = rng.choice([s for s in set(weight_map.values()) if s != weight_map[tensor]])
    elif choice == "not-str":
        value = rng.choice([5, None, ["a.safetensors"], {"a": 1}, True])
    elif choice == "dir":
        (case / "dir.safetensors").mkdir()
        value = "dir.safetensors"
    elif choice == "backslash":
        value = "..\\" + weight_map[tensor]
    elif choice == "empty":
        value = ""
    elif choice == "not-st":
        value = weight_map[tensor].replace(".safetensors", ".bin")
    elif choice == "link-out":  # a link inside the folder to a copy outside it: the index may not leave
        outside = case.parent / f"{case.name}-outside.safetensors"
        shutil.copy(case / weight_map[tensor], outside)
        os.symlink(outside, case / "out.safetensors")
        value = "out.safetensors"
    elif choice == "link-in":  # a link to a shard of the same folder: the same shard, benign
        os.symlink(weight_map[tensor], case / "alias.safetensors")
        expect, value = EITHER, "alias.safetensors"
    else:
        expect, value = BENIGN, "./" + weight_map[tensor]
    if choice == "link-in":
        weight_map.update({k: value for k, v in list(weight_map.items()) if v == weight_map[tensor]})
    else:
        weight_map[tensor] = value
    (case / INDEX).write_text(json.dumps(index))
    return Mutation(expect, (INDEX, tensor, str(value)[:40]), f"index: {tensor} -> {choice} {str(value)[:60]!r}")


@mutator("index")
def index_file(rng: random.Random, case: Path, seed: str) -> Mutation:
    """The index itself broken: not JSON, no weight_map, a list, a FIFO, two indexes, a tensor it
    does not list (loaded anyway: the shard's header is the authority for its own tensors)."""
    path = case / INDEX
    if not path.is_file():
        return layout(rng, case, seed)
    index = json.loads(path.read_text())
    choice = rng.choice(["broken", "no-map", "list", "map-list", "fifo", "two", "unlisted", "extra-tensor",
                         "empty-map", "huge"])
    expect = ERROR
    if choice == "broken":
        path.write_text(path.read_text()[:20])
    elif choice == "no-map":
        path.write_text(json.dumps({"metadata": {}}))
    elif choice == "list":
        path.write_text(json.dumps([index]))
    elif choice == "map-list":
        path.write_text(json.dumps({"weight_map": list(index["weight_map"].items())}))
    elif choice == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif choice == "two":
        shutil.copy(path, case / "other.safetensors.index.json")
    elif choice == "unlisted":
        index["weight_map"].pop(rng.choice(sorted(index["weight_map"])))
        path.write_text(json.dumps(index))
        expect = BENIGN
    elif choice == "extra-tensor":
        index["weight_map"]["not.in.any.shard"] = rng.choice(sorted(set(index["weight_map"].values())))
        path.write_text(json.dumps(index))
    elif choice == "empty-map":
        path.write_text(json.dumps({"weight_map": {}}))
    else:
        path.write_text("[" * 300_000 + "]" * 300_000)
    return Mutation(expect, (INDEX, "not.in.any.shard", "index"), f"index file: {choice}")


@mutator("layout")
def layout(rng: random.Random, case: Path, seed: str) -> Mutation:
    """Without an index: shard sets incomplete or with absurd totals, stray variants, FIFOs, device
    links, link loops, a folder named like weights, weights linked to a file outside (read: a regular
    file the user linked in is theirs to name), weights passed as a FIFO."""
    (case / INDEX).unlink(missing_ok=True)
    files = weight_files(case)
    choice = rng.choice(["lone-first", "huge-total", "gap", "stray", "fifo", "device", "loop", "dir",
                         "link-out", "weights-fifo", "none", "zero-shard", "link-in", "extra-total"])
    expect = ERROR
    hints: tuple[str, ...] = ("safetensors",)
    weights_path = None
    if choice in ("lone-first", "huge-total", "gap", "zero-shard", "extra-total"):
        for f in files[1:]:
            f.unlink()
        total = {"lone-first": "00003", "huge-total": "9" * 20, "gap": "00002", "zero-shard": "00001",
                 "extra-total": "00002"}[choice]
        number = "00000" if choice == "zero-shard" else "00001"
        files[0].rename(case / f"diffusion_pytorch_model-{number}-of-{total}.safetensors")
        if choice == "gap":
            shutil.copy(case / f"diffusion_pytorch_model-00001-of-{total}.safetensors",
                        case / f"diffusion_pytorch_model-00003-of-{total}.safetensors")
        if choice == "zero-shard" and len(files) == 1:  # one file, whatever its name, is a checkpoint
            expect = EITHER
        if choice == "extra-total":
            (case / "diffusion_pytorch_model-00001-of-00002.safetensors").rename(
                case / "diffusion_pytorch_model-00001-of-00001.safetensors")
            expect = EITHER if len(files) == 1 else ERROR
    elif choice == "stray":
        shutil.copy(files[0], case / "variant.safetensors")
    elif choice == "fifo":
        for f in files:
            f.unlink()
        os.mkfifo(case / "diffusion_pytorch_model.safetensors")
    elif choice == "device":
        for f in files:
            f.unlink()
        os.symlink("/dev/zero", case / "diffusion_pytorch_model.safetensors")
    elif choice == "loop":
        for f in files:
            f.unlink()
        os.symlink("diffusion_pytorch_model.safetensors", case / "diffusion_pytorch_model.safetensors")
    elif choice == "dir":
        for f in files:
            f.unlink()
        (case / "diffusion_pytorch_model.safetensors").mkdir()
    elif choice == "none":
        for f in files:
            f.unlink()
    elif choice in ("link-out", "link-in"):
        return _link(case, files, choice)
    else:  # weights-fifo
        os.mkfifo(case / "weights.safetensors")
        weights_path = str(case / "weights.safetensors")
        hints = ("weights.safetensors",)
    return Mutation(expect, hints, f"layout: {choice}", weights_path=weights_path)


def _link(case: Path, files: list[Path], choice: str) -> Mutation:
    """Each weights file replaced by a link to a regular file with the same bytes, outside the
    folder or beside it under another name: diffgen reads a regular file a user linked in."""
    for f in files:
        target = (case.parent / f"{case.name}-{f.name}") if choice == "link-out" else f.with_name(f"real-{f.name}.data")
        f.rename(target)
        os.symlink(target, f)
    return Mutation(BENIGN, what=f"layout: {choice}", outside=choice == "link-out")
