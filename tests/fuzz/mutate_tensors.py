"""Mutations of tensor values and of safetensors structure: scales, weights, headers, bytes."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

from .case import (BENIGN, EITHER, ERROR, Mutation, mutator, pick_tensor, read_raw, tensor_entries, weight_files,
                   write_raw)

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
SCALE_LEAVES = ("weight_scale", "weight_scale_inv", "input_scale", "weight_scale_2")


def encode(value: float, code: str) -> bytes | None:
    """``value`` as one element of dtype ``code``, or None where the dtype cannot hold it."""
    if code == "F32":
        return struct.pack("<f", value) if not (math.isfinite(value) and abs(value) > 3.4e38) else None
    if code == "BF16":
        return struct.pack("<f", value)[2:] if not (math.isfinite(value) and abs(value) > 3.38e38) else None
    if code == "F16":
        return struct.pack("<e", value) if not (math.isfinite(value) and abs(value) > 65504) else None
    if code == "F8_E4M3":  # S.EEEE.MMM, bias 7, no infinity: S.1111.111 is NaN
        if math.isnan(value) or math.isinf(value):
            return bytes([0x7F])
        sign = 0x80 if math.copysign(1, value) < 0 else 0
        table = {0: 0x00, 1: 0x38, 2: 0x40, 448: 0x7E, 0.5: 0x30}
        return bytes([sign | table[abs(value)]]) if abs(value) in table else None
    return None


def _set_elements(path: Path, entry: dict, values: list[tuple[int, float]]) -> bool:
    header, data = read_raw(path)
    code = entry["dtype"]
    size = ITEMSIZE.get(code)
    begin, end = entry["data_offsets"]
    data = bytearray(data)
    for index, value in values:
        raw = encode(value, code)
        if raw is None or size is None or begin + (index + 1) * size > end:
            return False
        data[begin + index * size: begin + (index + 1) * size] = raw
    write_raw(path, header, bytes(data))
    return True


def _numel(entry: dict) -> int:
    return math.prod(entry["shape"])


@mutator("scales")
def scale_value(rng: random.Random, case: Path, seed: str) -> Mutation:
    """One element (or all) of a scale set to NaN, inf, zero, a negative, 3e38 or a subnormal."""
    picked = pick_tensor(rng, case, lambda name, e: name.rsplit(".", 1)[-1] in SCALE_LEAVES and _numel(e) > 0)
    if picked is None:
        return weight_value(rng, case, seed)
    path, name, entry = picked
    value = rng.choice([math.nan, math.inf, -math.inf, 0.0, -1.0, -0.5, 3e38, 1e-45, 2.0, 0.5])
    n = _numel(entry)
    indices = range(n) if rng.random() < 0.3 else [rng.randrange(n)]
    if not _set_elements(path, entry, [(i, value) for i in indices]):
        return Mutation(BENIGN, what=f"{name}: {value} not representable in {entry['dtype']}; unchanged")
    leaf = name.rsplit(".", 1)[-1]
    block_scale = entry["dtype"] == "F8_E4M3"  # NVFP4's per-16 scales: zero is a valid (all-zero) block
    if math.isnan(value) or math.isinf(value) or value < 0 or value == 3e38 or (value == 0 and not block_scale):
        expect = ERROR
    else:  # a subnormal, zero block scale, or plain different value: faithful load or refusal
        expect = EITHER
    return Mutation(expect, (name, leaf), f"{name} [{len(indices)} elements] = {value}")


@mutator("weights")
def weight_value(rng: random.Random, case: Path, seed: str) -> Mutation:
    """NaN or infinity bytes in a weight (FP8, 16-bit or 32-bit), or a finite change."""
    picked = pick_tensor(rng, case, lambda name, e: e["dtype"] in ("F32", "BF16", "F16", "F8_E4M3")
                         and _numel(e) > 0 and name.rsplit(".", 1)[-1] not in SCALE_LEAVES)
    path, name, entry = picked
    value = rng.choice([math.nan, math.inf, -math.inf, 1.0, 448.0])
    if not _set_elements(path, entry, [(rng.randrange(_numel(entry)), value)]):
        return Mutation(BENIGN, what="unrepresentable; unchanged")
    expect = ERROR if not math.isfinite(value) else EITHER
    return Mutation(expect, (name,), f"{name} element = {value}")


@mutator("scales")
def scale_shape(rng: random.Random, case: Path, seed: str) -> Mutation:
    """A scale tensor replaced by one of another shape (its bytes repeated or cut to fit)."""
    picked = pick_tensor(rng, case, lambda name, e: name.rsplit(".", 1)[-1] in SCALE_LEAVES)
    if picked is None:
        return header_entry(rng, case, seed)
    path, name, entry = picked
    header, data = read_raw(path)
    shape = list(entry["shape"])
    rows = shape[0] if shape else 1
    new = rng.choice([[0], [2], [rows + 1], [1, 1], [rows, 1], [], [1], [max(rows // 2, 1)], [rows, 2], [3, 0]])
    return _replace_tensor(path, header, data, name, new, entry["dtype"], rng)


def _replace_tensor(path, header, data, name, shape, code, rng, what=None) -> Mutation:
    """Rewrite ``path`` with ``name`` holding ``shape`` elements of ``code`` (bytes from the old value)."""
    entries = {k: header[k] for k in tensor_entries(header)}
    blobs = {k: data[e["data_offsets"][0]:e["data_offsets"][1]] for k, e in entries.items()}
    size = math.prod(shape) * ITEMSIZE[code]
    old = blobs[name] or b"\x00"
    blobs[name] = (old * (size // len(old) + 1))[:size]
    entries[name] = {"dtype": code, "shape": shape}
    out, position = {"__metadata__": header.get("__metadata__", {})}, 0
    for k in sorted(entries):
        out[k] = {"dtype": entries[k]["dtype"], "shape": entries[k]["shape"],
                  "data_offsets": [position, position + len(blobs[k])]}
        position += len(blobs[k])
    write_raw(path, out, b"".join(blobs[k] for k in sorted(entries)))
    return Mutation(EITHER, (name,), what or f"{name} reshaped to {shape} ({code})")


@mutator("scales")
def scale_dtype(rng: random.Random, case: Path, seed: str) -> Mutation:
    """A tensor stored in another dtype: converted values (F32 <-> F16/BF16) or reinterpreted bytes."""
    picked = pick_tensor(rng, case, lambda name, e: _numel(e) > 0)
    path, name, entry = picked
    header, data = read_raw(path)
    code = rng.choice(["F16", "BF16", "F32", "I32", "U8", "F8_E4M3", "F8_E5M2", "BOOL", "I64", "F64"])
    same_size = [c for c in ITEMSIZE if ITEMSIZE[c] == ITEMSIZE[entry["dtype"]] and c != entry["dtype"]]
    if rng.random() < 0.5 and same_size:  # reinterpret the bytes: a consistent header, different values
        header[name]["dtype"] = rng.choice(same_size)
        write_raw(path, header, data)
        return Mutation(EITHER, (name,), f"{name} declared {header[name]['dtype']} (was {entry['dtype']})")
    return _replace_tensor(path, header, data, name, entry["shape"], code, rng, f"{name} rewritten as {code}")


@mutator("safetensors")
def header_length(rng: random.Random, case: Path, seed: str) -> Mutation:
    """The 8-byte header length off by a little or a lot, or pointing into trailing padding."""
    path = rng.choice(weight_files(case))
    header, data = read_raw(path)
    pad = rng.choice([0, 0, 8, 64])
    delta = rng.choice([-1, 1, 2, 8, -8, 10**6, 2**40, 2**63 - 1 - 10**6, -(pad or 1)])
    if delta < 0 and -delta <= pad:  # N ends inside the padding: the JSON parses, data shifts
        write_raw(path, header, data, pad=pad, length_delta=delta)
        return Mutation(ERROR, (path.name,), f"{path.name}: header length {delta} into {pad} bytes of padding")
    text_len = len(json.dumps(header, separators=(",", ":")).encode()) + pad
    if text_len + delta < 0:
        delta = 1
    write_raw(path, header, data, pad=pad, length_delta=delta)
    return Mutation(ERROR, (path.name,), f"{path.name}: header length {delta:+d} (pad {pad})")


@mutator("safetensors")
def header_benign(rng: random.Random, case: Path, seed: str) -> Mutation:
    """Rewrites the format allows: padding spaces, reordered keys, metadata added or removed."""
    path = rng.choice(weight_files(case))
    header, data = read_raw(path)
    choice = rng.choice(["pad", "reorder", "metadata", "no-metadata"])
    if choice == "reorder":
        keys = list(header)
        rng.shuffle(keys)
        header = {k: header[k] for k in keys}
    elif choice == "metadata":
        header.setdefault("__metadata__", {})["fuzz"] = "x" * rng.randrange(1, 300)
    elif choice == "no-metadata" and header.get("__metadata__", {}).get("format") == "pt":
        header.pop("__metadata__")
    write_raw(path, header, data, pad=rng.choice([0, 1, 7, 100]) if choice == "pad" else 0)
    return Mutation(BENIGN, what=f"{path.name}: {choice}")


@mutator("safetensors")
def offsets(rng: random.Random, case: Path, seed: str) -> Mutation:
    """data_offsets shifted, overlapping, out of range, or swapped between two equal-sized tensors."""
    path = rng.choice(weight_files(case))
    header, data = read_raw(path)
    names = tensor_entries(header)
    name = rng.choice(names)
    begin, end = header[name]["data_offsets"]
    choice = rng.choice(["all+1", "one-end+1", "one-begin-1", "beyond", "negative", "huge", "swap", "float"])
    expect = ERROR
    if choice == "all+1":
        for k in names:
            header[k]["data_offsets"] = [o + 1 for o in header[k]["data_offsets"]]
        data = data + b"\x00"
    elif choice == "one-end+1":
        header[name]["data_offsets"] = [begin, end + 1]
    elif choice == "one-begin-1":
        header[name]["data_offsets"] = [max(begin - 1, 0), end - 1 if end > begin else end]
    elif choice == "beyond":
        header[name]["data_offsets"] = [len(data) + 4, len(data) + 4 + end - begin]
    elif choice == "negative":
        header[name]["data_offsets"] = [-4, end - begin - 4]
    elif choice == "huge":
        header[name]["data_offsets"] = [2**64 - 1, 2**64 - 1 + end - begin]
    elif choice == "float":
        header[name]["data_offsets"] = [float(begin), float(end)]
    else:
        same = [k for k in names if k != name and header[k]["dtype"] == header[name]["dtype"]
                and header[k]["shape"] == header[name]["shape"]]
        if not same:
            return Mutation(BENIGN, what="no tensor to swap with; unchanged")
        other = rng.choice(same)
        header[name]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], [begin, end]
        expect = EITHER  # a consistent file whose two tensors trade values
    write_raw(path, header, data)
    return Mutation(expect, (path.name, name), f"{path.name}: {choice} on {name}")


@mutator("safetensors")
def header_entry(rng: random.Random, case: Path, seed: str) -> Mutation:
    """A header entry's shape or dtype made hostile: 2**70 beside 0, negatives, floats, unknown dtypes."""
    path = rng.choice(weight_files(case))
    header, data = read_raw(path)
    name = rng.choice(tensor_entries(header))
    entry = header[name]
    key = rng.choice(["shape", "shape", "dtype", "entry"])
    if key == "shape":
        entry["shape"] = rng.choice([[0, 2**70], [2**70, 0], [2**63, 2], [2**40, 2**40], [-1], [1.5], [True],
                                     ["3"], None, 5, [[2]], [0], [2**41, 0], list(range(40))])
    elif key == "dtype":
        entry["dtype"] = rng.choice(["F8", "f32", "", 5, None, "FLOAT", "F4", "I128", "C64", ["F32"], "F32 "])
    else:
        header[name] = rng.choice([None, [], "x", 5, {"dtype": "F32"}, {**entry, "extra": 1}])
        if isinstance(header[name], dict) and "extra" in header[name]:
            write_raw(path, header, data)  # an unknown key: the safetensors library ignores it too
            return Mutation(EITHER, (path.name, name), f"{name}: extra key")
    write_raw(path, header, data)
    return Mutation(ERROR, (path.name, name), f"{path.name}: {name} {key} -> {str(header[name])[:80]}")


@mutator("safetensors")
def header_json(rng: random.Random, case: Path, seed: str) -> Mutation:
    """The header is not the JSON object it must be: invalid UTF-8, a list, duplicate keys, deep nesting,
    metadata that is not strings."""
    path = rng.choice(weight_files(case))
    header, data = read_raw(path)
    text = json.dumps(header).encode()
    choice = rng.choice(["utf8", "list", "dup", "deep", "meta", "nul", "empty", "number"])
    if choice == "utf8":
        text = text[:1] + b"\xff\xfe" + text[3:]
    elif choice == "list":
        text = b"[" + text + b"]"
    elif choice == "dup":
        first = tensor_entries(header)[0]
        text = text[:-1] + b"," + json.dumps({first: header[first]})[1:].encode()
    elif choice == "deep":
        text = b"[" * 100_000 + b"]" * 100_000
    elif choice == "meta":
        text = json.dumps({**header, "__metadata__": {"a": rng.choice([1, None, [], {"b": "c"}])}}).encode()
    elif choice == "nul":
        text = text.replace(b'"', b'"\x00', 1)
    elif choice == "empty":
        text = b""
    else:
        text = b"12345"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return Mutation(ERROR, (path.name,), f"{path.name}: header {choice}")


@mutator("safetensors")
def truncate(rng: random.Random, case: Path, seed: str) -> Mutation:
    """The file cut short (inside the length, the header or the data), emptied, or grown."""
    path = rng.choice(weight_files(case))
    blob = path.read_bytes()
    choice = rng.choice(["cut", "cut", "empty", "append", "short"])
    if choice == "cut":
        blob = blob[:rng.randrange(len(blob))]
    elif choice == "empty":
        blob = b""
    elif choice == "short":
        blob = blob[:rng.randrange(8)]
    else:
        blob = blob + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    path.write_bytes(blob)
    return Mutation(ERROR, (path.name,), f"{path.name}: {choice} to {len(blob)} bytes")


@mutator("bytes")
def flip_bytes(rng: random.Random, case: Path, seed: str) -> Mutation:
    """Random bytes changed anywhere in a weights file: the header, the data, or both."""
    path = rng.choice(weight_files(case))
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    region = rng.choice(["header", "data", "any"])
    lo, hi = {"header": (8, 8 + n), "data": (8 + n, len(blob)), "any": (0, len(blob))}[region]
    for _ in range(rng.choice([1, 1, 2, 8])):
        if hi > lo:
            blob[rng.randrange(lo, hi)] = rng.randrange(256)
    path.write_bytes(bytes(blob))
    return Mutation(EITHER, (path.name,), f"{path.name}: bytes flipped in the {region}")
