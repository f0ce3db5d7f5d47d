"""What a mutation did and what must come of it, and the raw-file helpers the mutators share.

A mutator gets a copy of a valid seed checkpoint, breaks (or harmlessly rewrites) one thing, and
returns a :class:`Mutation` saying what a correct diffgen does with the result:

- ``error``: refuse it with a DiffgenError whose message names one of ``hints`` (the file, tensor
  or config key that is wrong); a load that succeeds is a silent corrupt load;
- ``benign``: load it, with weights equal to the seed's (read by the safetensors library);
- ``either``: refuse it (naming one of ``hints``) or load it with weights equal to an independent
  decode of the mutated files, every scale finite and positive and every quantized layer computing
  what its tensors define.

Safetensors files are edited here byte by byte, from the format's description, never through
diffgen's own reader.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ERROR, BENIGN, EITHER = "error", "benign", "either"


@dataclass
class Mutation:
    expect: str
    hints: tuple[str, ...] = ()
    what: str = ""
    path: str | None = None          # what to pass as the checkpoint path (default: the case directory)
    weights_path: str | None = None  # and as weights_path
    outside: bool = False            # the load may read files outside the case directory (a link out)
    extra: dict = field(default_factory=dict)


Mutator = Callable[[random.Random, Path, str], Mutation]
MUTATORS: dict[str, tuple[str, Mutator]] = {}  # name -> (class, mutator)


def load_mutators() -> dict[str, tuple[str, Mutator]]:
    """Every mutator (importing the modules that register them)."""
    import importlib

    for module in ("mutate_config", "mutate_files", "mutate_layout", "mutate_tensors"):
        importlib.import_module(f"{__package__}.{module}")
    return MUTATORS


def mutator(klass: str):
    def register(fn: Mutator) -> Mutator:
        MUTATORS[fn.__name__] = (klass, fn)
        return fn
    return register


# -- raw safetensors ------------------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header as parsed JSON, data region bytes)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path: Path, header: dict, data: bytes, *, pad: int = 0, length_delta: int = 0) -> None:
    """Write ``header`` (JSON, ``pad`` trailing spaces) and ``data``; ``length_delta`` falsifies N."""
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text) + length_delta) + text + data)


def tensor_entries(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def weight_files(case: Path) -> list[Path]:
    return sorted(case.glob("*.safetensors"))


def config_of(case: Path) -> dict:
    return json.loads((case / "config.json").read_text())


def write_config(case: Path, config: dict) -> None:
    (case / "config.json").write_text(json.dumps(config))


def pick_tensor(rng: random.Random, case: Path, predicate=lambda name, entry: True) -> tuple[Path, str, dict] | None:
    """A random (file, tensor name, header entry) among the case's files, or None."""
    choices = []
    for f in weight_files(case):
        header, _ = read_raw(f)
        choices += [(f, k, header[k]) for k in tensor_entries(header) if predicate(k, header[k])]
    return rng.choice(choices) if choices else None


FLOAT_CODES = {"F32": ("<f", 4), "F16": ("<e", 2)}
