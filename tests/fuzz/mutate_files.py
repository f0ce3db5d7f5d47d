"""Mutations of the files around the tensors: pickle checkpoints, sidecar JSON, a quantization_config
kept in safetensors metadata, config.json replaced by something that is not a file."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .case import BENIGN, EITHER, ERROR, Mutation, config_of, mutator, read_raw, weight_files, write_config, write_raw

INDEX = "diffusion_pytorch_model.safetensors.index.json"


class _RunsCode:
    """Unpickling this calls os.getpid: a stand-in for a payload (weights_only must refuse it)."""

    def __reduce__(self):
        return os.getpid, ()


def _state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@mutator("pickle")
def pickle_file(rng: random.Random, case: Path, seed: str) -> Mutation:
    """The weights as torch.save pickles (.bin): zip or legacy format, nested under state_dict, with
    extra entries; or a payload, a list, NaN, a truncated file; loaded only with allow_pickle."""
    choice = rng.choice(["zip", "legacy", "nested", "extras", "not-allowed", "payload", "list", "nan", "truncated"])
    (case / INDEX).unlink(missing_ok=True)
    first = None
    fp8 = False
    for f in weight_files(case):
        state: object = _state(f)
        fp8 = fp8 or any(v.dtype.itemsize == 1 and v.is_floating_point() for v in state.values())
        if choice == "nested":
            state = {"state_dict": state, "epoch": 3}
        elif choice == "extras":
            state = {**state, "step": 5, "version": "1.0"}
        elif choice == "payload":
            state = {**state, "payload": _RunsCode()}
        elif choice == "list":
            state = list(state.values())
        elif choice == "nan":
            name = rng.choice(sorted(k for k, v in state.items() if v.is_floating_point() and v.element_size() > 1))
            state[name] = state[name].clone()
            state[name].view(-1)[0] = float("nan")
        target = f.with_suffix(".bin")
        torch.save(state, target, _use_new_zipfile_serialization=choice != "legacy")
        if choice == "truncated":
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        f.unlink()
        first = first or target
    expect = BENIGN if choice in ("zip", "legacy", "nested", "extras") else ERROR
    if choice == "legacy" and fp8:  # torch's legacy format cannot hold float8 storages: refusing is right
        expect = EITHER
    return Mutation(expect, (first.name,), f"pickle: {choice}", extra={"allow_pickle": choice != "not-allowed"})


@mutator("sidecar")
def sidecar(rng: random.Random, case: Path, seed: str) -> Mutation:
    """hf_quant_config.json (ModelOpt's nested declaration) or another sidecar, hostile or broken;
    config.json replaced by a FIFO, a folder or a link to nowhere."""
    choice = rng.choice(["exclude-types", "not-object", "quantization-5", "broken", "nvfp4", "fp8", "deep",
                         "other-broken", "config-fifo", "config-dir", "config-dangling", "empty-object"])
    path = case / "hf_quant_config.json"
    expect = EITHER
    hints: tuple[str, ...] = ("hf_quant_config.json", "exclude_modules", "quant_algo")
    if choice == "exclude-types":
        path.write_text(json.dumps({"quantization": {"quant_algo": "FP8", "exclude_modules": [1, None]}}))
    elif choice == "not-object":
        path.write_text("[]")
        expect = ERROR
    elif choice == "quantization-5":
        path.write_text(json.dumps({"quantization": 5}))
    elif choice == "broken":
        path.write_text('{"quantization": {')
        expect = ERROR
    elif choice == "nvfp4":
        path.write_text(json.dumps({"quantization": {"quant_algo": "NVFP4", "exclude_modules": ["proj_out"]}}))
    elif choice == "fp8":
        path.write_text(json.dumps({"quantization": {"quant_algo": "FP8", "exclude_modules": ["*"]}}))
    elif choice == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
        expect = ERROR
    elif choice == "other-broken":
        (case / "notes.json").write_bytes(b"\xff\xfe{")
        hints, expect = ("notes.json",), ERROR
    elif choice == "empty-object":
        path.write_text("{}")
    else:
        (case / "config.json").unlink()
        if choice == "config-fifo":
            os.mkfifo(case / "config.json")
        elif choice == "config-dir":
            (case / "config.json").mkdir()
        else:
            os.symlink(case / "gone.json", case / "config.json")
        hints, expect = ("config.json",), ERROR
    return Mutation(expect, hints, f"sidecar: {choice}")


@mutator("metadata")
def metadata_quantization_config(rng: random.Random, case: Path, seed: str) -> Mutation:
    """The quantization_config moved from config.json into every file's safetensors metadata (as
    some exports keep it: benign), or a hostile string there."""
    config = config_of(case)
    qc = config.pop("quantization_config", None)
    write_config(case, config)
    choice = rng.choice(["moved", "moved", "not-json", "list", "other-method", "nested-deep"])
    text = {"moved": json.dumps(qc), "not-json": "{quant_method: fp8", "list": "[1, 2]",
            "other-method": json.dumps({"quant_method": rng.choice(["fp8", "modelopt", "awq", 5, None])}),
            "nested-deep": "[" * 50_000 + "]" * 50_000}[choice]
    if choice == "moved" and qc is None:
        return Mutation(BENIGN, what="metadata: a 16-bit seed has nothing to move")
    for f in weight_files(case):
        header, data = read_raw(f)
        header.setdefault("__metadata__", {})["quantization_config"] = text
        write_raw(f, header, data)
    expect = BENIGN if choice == "moved" else EITHER
    return Mutation(expect, ("quantization_config", "metadata"), f"metadata quantization_config: {choice}")
