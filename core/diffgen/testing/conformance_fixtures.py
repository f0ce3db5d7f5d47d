"""Fixtures and small helpers of the conformance suite (see :mod:`diffgen.testing.conformance`):
fixture writers for the builtin formats and installed plugins, the per-class context, tensor
comparisons."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..hookspecs import HOOK_NAMES
from ..platform import Platform

FixtureWriter = Callable[[Path, Path], Any]  # (16-bit transformer dir, output dir) -> ignored
FIXTURE_ENTRY_POINT_GROUP = "diffgen.fixtures"
HOOKS = HOOK_NAMES
UNKNOWN_FAMILY = "diffgen-conformance-unknown"


def _copy_16bit(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())


def _fp8_writer(scheme: str) -> FixtureWriter:
    def write(src: Path, dst: Path) -> None:
        import diffgen

        diffgen.quantize(src, dst, scheme=scheme)
    write.__qualname__ = f"fp8_{scheme}_writer"
    return write


BUILTIN_FIXTURE_WRITERS: dict[str, FixtureWriter] = {
    "16bit": _copy_16bit,
    "fp8-per-channel": _fp8_writer("per-channel"),
    "fp8-per-tensor": _fp8_writer("per-tensor"),
    "fp8-block": _fp8_writer("block"),
}

# Devices described, not present: check_platform and create_linear_method must answer from the
# Platform alone (an offer that cannot run says why), never by probing the real hardware.
FAKE_PLATFORMS: dict[str, Platform] = {
    "cpu": Platform("cpu", "cpu", "conformance CPU"),
    "cuda-sm80": Platform("cuda", "cuda:0", "NVIDIA A100-SXM4-80GB", (8, 0), None, 80 << 30),
    "cuda-sm89": Platform("cuda", "cuda:0", "NVIDIA L40S", (8, 9), None, 48 << 30),
    "cuda-sm90": Platform("cuda", "cuda:0", "NVIDIA H100 80GB HBM3", (9, 0), None, 80 << 30),
    "cuda-sm100": Platform("cuda", "cuda:0", "NVIDIA B200", (10, 0), None, 180 << 30),
    "cuda-sm120": Platform("cuda", "cuda:0", "NVIDIA GeForce RTX 5090", (12, 0), None, 32 << 30),
    "rocm-gfx942": Platform("rocm", "cuda:0", "AMD Instinct MI300X", None, "gfx942", 192 << 30),
    "rocm-gfx950": Platform("rocm", "cuda:0", "AMD Instinct MI355X", None, "gfx950", 288 << 30),
    "mps": Platform("mps", "mps", "Apple MPS"),
    "npu": Platform("npu", "npu:0", "Ascend910B"),
}

# quantization_config values no format uses: a detector must answer None, not raise.
HOSTILE_QUANTIZATION_CONFIGS: dict[str, Any] = {
    "string": "not-a-format",
    "list": ["int8", 8],
    "number": 8,
    "empty": {},
    "method-number": {"quant_method": 8},
    "method-null": {"quant_method": None},
    "method-object": {"quant_method": {"name": "x"}, "config_groups": "oops"},
    "unknown-method": {"quant_method": UNKNOWN_FAMILY, "bits": "eight", "ignored_layers": 3},
}


# -- fixtures ---------------------------------------------------------------------------------
def installed_fixture_writers() -> dict[str, FixtureWriter]:
    """Writers published by installed distributions in group ``diffgen.fixtures``, loaded lazily."""
    from .. import plugins

    deny = set(plugins._env_list("DIFFGEN_DISABLE_PLUGINS") or [])
    writers: dict[str, FixtureWriter] = {}
    for ep in plugins.importlib_metadata.entry_points(group=FIXTURE_ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else ""
        if ep.name not in writers and not deny & {ep.name, dist}:
            writers[ep.name] = _lazy_entry_point(ep)
    return writers


def _lazy_entry_point(ep) -> FixtureWriter:
    def write(src: Path, dst: Path) -> Any:
        return ep.load()(src, dst)
    write.__qualname__ = f"entry_point:{ep.value}"
    return write


_WRITTEN: dict[tuple, Path] = {}  # (writer, family) -> fixture, shared by every suite in a session


def write_fixture(name: str, writer: FixtureWriter, src: Path, directory: Path, family: str) -> Path:
    """Run ``writer`` once per session for (writer, family); later calls reuse the directory."""
    key = (name, getattr(writer, "__module__", ""), getattr(writer, "__qualname__", repr(writer)), family)
    cached = _WRITTEN.get(key)
    if cached is not None and cached.is_dir():
        return cached
    dst = directory / name
    writer(src, dst)
    if not (dst / "config.json").is_file():
        raise AssertionError(f"fixture writer {name!r} wrote no config.json in {dst}")
    _WRITTEN[key] = dst
    return dst


def _hostile_fixture(src: Path, dst: Path, quantization_config: Any) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    for weights in src.glob("*.safetensors"):
        target = dst / weights.name
        if not target.exists():
            try:
                target.symlink_to(weights.resolve())
            except OSError:
                target.write_bytes(weights.read_bytes())
    return dst


@dataclass
class ConformanceContext:
    """Checkpoints and the device one suite runs with."""

    source_16bit: Path          # the tiny 16-bit transformer every writer started from
    own: dict[str, Path]        # the tested plugin's fixtures
    foreign: dict[str, Path]    # every other format's fixtures, 16-bit included
    hostile: dict[str, Path]    # 16-bit tensors under a malformed quantization_config
    platform: Platform          # where models are loaded and run
    dtype: torch.dtype          # compute dtype: fp32 on the CPU, bf16 on accelerators


# -- small pieces -----------------------------------------------------------------------------
class _CountingStream:
    """An iterator of (name, tensor) pairs that counts what has been taken from it."""

    def __init__(self, pairs: Iterable[tuple[str, torch.Tensor]]):
        self._pairs = iter(pairs)
        self.taken = 0

    def __iter__(self) -> "_CountingStream":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        pair = next(self._pairs)
        self.taken += 1
        return pair


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(_raw(a), _raw(b))


def _compatible_shape(a: tuple, b: tuple) -> bool:
    """As the loader does: singleton dimensions carry no meaning ([] vs [1], [N] vs [N, 1])."""
    return a == b or [s for s in a if s != 1] == [s for s in b if s != 1]


def _compatible_dtype(a: torch.dtype, b: torch.dtype) -> bool:
    floats = (torch.float16, torch.bfloat16, torch.float32)  # the loader converts among these
    return a == b or (a in floats and b in floats)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return (out[0] if isinstance(out, list) else out).float().cpu()


def _on(inputs: dict, platform: Platform, dtype: torch.dtype) -> dict:
    def move(v):
        if torch.is_tensor(v):
            return v.to(platform.device, dtype if v.is_floating_point() else v.dtype)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v
    return {k: move(v) for k, v in inputs.items()}


def _one_line(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip()) and "\n" not in text.strip()


def _owner(name: str) -> str:
    return name.rpartition(".")[0]
