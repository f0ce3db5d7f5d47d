"""What hardware and libraries this process has.

The core knows CUDA, ROCm, MPS and CPU; plugins add other device kinds (an NPU) through their
``check_platform`` reports. Optional libraries are imported only when someone asks, once.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .errors import DiffgenError


@dataclass(frozen=True)
class LibraryStatus:
    name: str
    available: bool
    reason: str = ""  # why not, or the version when available


@lru_cache(maxsize=None)
def library(name: str) -> LibraryStatus:
    """Import ``name`` once and say whether it worked (never raises)."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # an optional library may fail in any way (missing .so, ABI clash)
        return LibraryStatus(name, False, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return LibraryStatus(name, True, str(getattr(module, "__version__", "")))


@dataclass(frozen=True)
class Platform:
    device_kind: str  # "cuda", "rocm", "mps", "cpu", or a plugin's kind such as "npu"
    device: str  # a torch device string, e.g. "cuda:0"
    device_name: str
    capability: tuple[int, int] | None = None  # CUDA compute capability
    gfx_arch: str | None = None  # ROCm architecture, e.g. "gfx942"
    total_memory: int | None = None  # bytes
    torch_version: str = torch.__version__

    def library(self, name: str) -> LibraryStatus:
        return library(name)

    def describe(self) -> str:
        extra = []
        if self.capability:
            extra.append(f"SM{self.capability[0]}{self.capability[1]}")
        if self.gfx_arch:
            extra.append(self.gfx_arch)
        if self.total_memory:
            extra.append(f"{self.total_memory / 2**30:.0f} GiB")
        suffix = f" ({', '.join(extra)})" if extra else ""
        return f"{self.device_kind} {self.device_name}{suffix}, torch {self.torch_version}"

    def to_dict(self) -> dict:
        return {
            "device_kind": self.device_kind,
            "device": self.device,
            "device_name": self.device_name,
            "capability": list(self.capability) if self.capability else None,
            "gfx_arch": self.gfx_arch,
            "total_memory": self.total_memory,
            "torch_version": self.torch_version,
        }


@dataclass
class KernelStatus:
    name: str
    available: bool
    reason: str = ""


@dataclass
class PlatformReport:
    """A plugin's answer to ``check_platform``: its kernels, each usable here or not, and why."""

    kernels: list[KernelStatus] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def kernel(self, name: str, available: bool, reason: str = "") -> "PlatformReport":
        self.kernels.append(KernelStatus(name, available, reason))
        return self

    def to_dict(self) -> dict:
        return {
            "kernels": [vars(k) for k in self.kernels],
            "notes": list(self.notes),
        }


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@lru_cache(maxsize=None)
def detect_platform(device: str | None = None) -> Platform:
    """Describe ``device`` (default: the first accelerator torch sees, else the CPU)."""
    try:
        dev = torch.device(device or _default_device())
    except RuntimeError as exc:  # "foo", "cuda:x": torch's own words say what it expected
        raise DiffgenError(f"--device {device!r} is not a device torch knows: {str(exc).splitlines()[0]}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None \
                and torch.version.hip is None else "torch sees no CUDA or ROCm GPU (driver, CUDA_VISIBLE_DEVICES?)"
            raise DiffgenError(f"--device {device}: {build}; use --device cpu, or leave --device out to take "
                               "the first accelerator there is")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffgenError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), "
                               f"numbered 0 to {torch.cuda.device_count() - 1}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        if torch.version.hip:
            arch = getattr(props, "gcnArchName", "") or ""
            match = re.match(r"gfx[0-9a-f]+", arch)
            return Platform("rocm", f"cuda:{index}", props.name, None,
                            match.group(0) if match else arch or None, props.total_memory)
        return Platform("cuda", f"cuda:{index}", props.name, (props.major, props.minor),
                        None, props.total_memory)
    if dev.type == "mps":
        return Platform("mps", "mps", "Apple MPS")
    if dev.type == "cpu":
        import platform as _stdlib_platform

        return Platform("cpu", "cpu", _stdlib_platform.processor() or _stdlib_platform.machine())
    # Devices the core does not know (npu, xpu, ...) are described by plugins' reports.
    return Platform(dev.type, str(dev), dev.type)


# --dtype names; "auto" is bf16 on accelerators and fp32 on the CPU, where bf16 GEMMs are slow.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def resolve(device: str | Platform | None = None, dtype: str | torch.dtype | None = "auto"
            ) -> tuple[Platform, torch.dtype]:
    """The platform and the compute dtype of one request, worked out once where a request enters
    diffgen (the API functions, the CLI) and passed down from there, so that ``inspect`` plans on
    the machine and dtype that ``generate`` runs with. ``device`` may already be a Platform (one
    described rather than detected, as the conformance suite does); ``dtype`` a name of DTYPES,
    "auto" (or None) or a torch.dtype."""
    platform = device if isinstance(device, Platform) else detect_platform(device)
    if dtype is None or dtype == "auto":
        return platform, torch.float32 if platform.device_kind == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return platform, dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return platform, DTYPES[dtype]
