"""The loader's NaN and infinity checks of every tensor it places, kept off the load's critical path.

On the CPU a check is computation. The reader checks each few MB of a tensor right after reading
them, while they are still in the cache, on its own threads (``safetensors_header.checked_reads``);
what it could not check (a tensor a plugin's repack or a dtype conversion made) is checked one
tensor behind the reads on a worker thread, and a layer is processed only once its tensors are
checked. On an accelerator a check is a reduction
queued on the device behind the tensor's copy; reading each result back would wait for that copy
and stall the next one (an H200 load of FLUX.1 FP8 lost 0.3 s of 3.4 to it), so the flags stay on
the device and are read once, when the load ends or a layer's processing fails (a NaN weight is
then named instead of whatever the processing made of it). The methods' own checks of what arrived
(``diffgen.linear.check_scales``) go through ``check_later``, and are deferred the same way.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

import torch

from .errors import LoadError


def nonfinite(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 0-dim bool tensor on ``tensor``'s device, True when it holds NaN or infinity; None when its
    dtype cannot (integers) or it is empty. FP8 by its bit patterns (e4m3fn has only NaN,
    S.1111.111); wider floats by their minimum and maximum: both reductions propagate NaN and show
    an infinity, and one aminmax pass runs near memory speed, where isfinite(...).all() was ~8x
    slower on the CPU (6 s of a 0.8 GB bf16 load)."""
    if tensor.numel() == 0:
        return None
    if tensor.dtype == torch.float8_e4m3fn:
        return (tensor.view(torch.uint8) & 0x7F).amax() == 0x7F
    if tensor.dtype == torch.float8_e5m2:
        return (tensor.view(torch.uint8) & 0x7C).amax() == 0x7C
    if not tensor.is_floating_point():
        return None
    if tensor.dtype.itemsize == 1:  # the fnuz and e8m0 types: their own NaN codes, rare enough to check plainly
        return ~torch.isfinite(tensor).all()
    low, high = torch.aminmax(tensor)
    return ~(torch.isfinite(low) & torch.isfinite(high))


# Set on a tensor the reader already found finite, chunk by chunk as it read them (CPU loads:
# ``safetensors_header.checked_reads``); the loader's own check then skips it.
CHECKED_AT_READ = "_diffgen_checked_at_read"


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor``."""
    flag = nonfinite(tensor)
    return flag is None or not bool(flag)


# IEEE binary floats: all exponent bits set (NaN or infinity), as an integer of the same width.
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000)}
_SCRATCH = threading.local()


def all_finite_cpu(tensor: torch.Tensor) -> bool:
    """``all_finite`` for a CPU tensor of a few MB, about 2x faster for 16- and 32-bit floats.

    First the plain sum: a NaN or an infinity anywhere makes it NaN or infinite, so a finite sum
    proves the tensor finite in one read-only pass (about twice the speed of the exact check below over
    bf16, which also writes a buffer). A sum that is not finite only says "maybe": large finite values
    can overflow it. Then the exact check: the exponent field masked into a reused integer buffer of
    this thread and its maximum taken (integer reductions run ~4x faster than aminmax over bf16 on a
    CPU). Other dtypes as ``all_finite``."""
    kind = _EXPONENT.get(tensor.dtype)
    if kind is None or tensor.numel() == 0 or not tensor.is_contiguous():
        return all_finite(tensor)
    if bool(torch.isfinite(tensor.sum())):
        return True
    itype, mask = kind
    bits = tensor.view(itype).reshape(-1)
    scratch = getattr(_SCRATCH, "buffer", None)
    if scratch is None or scratch.numel() * scratch.element_size() < bits.numel() * bits.element_size():
        scratch = _SCRATCH.buffer = torch.empty(bits.numel() * bits.element_size(), dtype=torch.uint8)
    out = scratch[: bits.numel() * bits.element_size()].view(itype)
    return int(torch.bitwise_and(bits, mask, out=out).max()) < mask


_DEFERRING: ContextVar["FiniteChecks | None"] = ContextVar("diffgen_deferred_checks", default=None)


def check_later(bad: torch.Tensor, refuse: Callable[[], None]) -> None:
    """Call ``refuse`` (which raises) if the 0-dim ``bad`` is True: now, or, while a load onto an
    accelerator is deferring its checks, when that load's checks finish."""
    checks = _DEFERRING.get()
    if checks is None:
        if bool(bad):
            refuse()
    else:
        checks.deferred.append((bad, refuse, checks.where))


def refusal(name: str, where: str) -> LoadError:
    """The error for a tensor holding NaN or infinity."""
    return LoadError(f"tensor {name!r} in {where} holds NaN or infinite values; the file is corrupt "
                     "(check_weights=False / --no-check-weights loads it anyway)")


class FiniteChecks:
    """The checks of one load. ``submit`` each placed tensor; ``before_processing`` before a layer is
    processed (on the CPU: raises for any bad tensor so far); ``finish`` at the end, and before
    reporting a failed processing (raises for any bad tensor so far, on every device)."""

    def __init__(self, enabled: bool, device: str | torch.device):
        self.enabled = enabled
        self.on_device = torch.device(device).type != "cpu"
        self._flags: list[tuple[str, str, torch.Tensor]] = []
        self.deferred: list[tuple[torch.Tensor, Callable[[], None], str]] = []  # (bad, refuse, where)
        self.where = ""  # the file of the layer being processed, for deferred refusals
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffgen-check") \
            if enabled and not self.on_device else None
        self._previous = None

    def submit(self, name: str, tensor: torch.Tensor, where: str) -> None:
        if not self.enabled or getattr(tensor, CHECKED_AT_READ, False):
            return
        if self.on_device:
            flag = nonfinite(tensor)
            if flag is not None:
                self._flags.append((name, where, flag))
            return
        self._wait_cpu()
        self._previous = self._pool.submit(self._check_cpu, name, tensor, where)

    @staticmethod
    def _check_cpu(name: str, tensor: torch.Tensor, where: str) -> None:
        if not all_finite_cpu(tensor):
            raise refusal(name, where)

    def _wait_cpu(self) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            previous.result()

    def before_processing(self) -> None:
        self._wait_cpu()

    @contextmanager
    def deferring(self):
        """Within the block, ``check_later`` defers to these checks (on an accelerator only)."""
        token = _DEFERRING.set(self if self.on_device else None)
        try:
            yield
        finally:
            _DEFERRING.reset(token)

    def finish(self) -> None:
        """Raise the first refusal among the checks so far: a NaN weight first, then a method's."""
        self._wait_cpu()
        flags = [flag for _, _, flag in self._flags] + [bad for bad, _, _ in self.deferred]
        if not flags:
            return
        verdicts = torch.stack(flags).cpu().tolist()  # the one read-back
        for (name, where, _), is_bad in zip(self._flags, verdicts):
            if is_bad:
                raise refusal(name, where)
        for (_, refuse, where), is_bad in zip(self.deferred, verdicts[len(self._flags):]):
            if is_bad:
                try:
                    refuse()
                except LoadError as exc:
                    raise LoadError(f"{exc} ({where})") from exc
        self._flags.clear()
        self.deferred.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
