"""Progress for long work: a bar on a terminal, a few plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import sys
import time


class ByteProgress:
    """Callable as ``progress(done_bytes, total_bytes, shard, shards)`` (the loader's progress hook)."""

    def __init__(self, label: str, *, quiet: bool = False, stream=None):
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_decile = -1
        self.last_draw = 0.0

    def __call__(self, done: int, total: int, shard: int = 1, shards: int = 1) -> None:
        if self.quiet or total <= 0:
            return
        fraction = min(done / total, 1.0)
        if self.tty:
            now = time.monotonic()
            if fraction < 1.0 and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            bar = "#" * int(fraction * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {done / 2**20:8.1f}/{total / 2**20:.1f} MiB, "
                              f"shard {shard}/{shards}")
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
            return
        decile = int(fraction * 4)  # plain lines at 0, 25, 50, 75 and 100 %
        if decile != self.last_decile:
            self.last_decile = decile
            print(f"{self.label}: {fraction:4.0%} ({done / 2**20:.1f} of {total / 2**20:.1f} MiB, "
                  f"shard {shard}/{shards})",
                  file=self.stream, flush=True)


class StepProgress:
    """Callable as ``progress(step, total, seconds)`` after each denoising step: one plain line each.

    Used where stderr is not a terminal; on a terminal diffusers' own step bar runs instead.
    """

    def __init__(self, label: str, *, stream=None):
        self.label = label
        self.stream = stream or sys.stderr

    def __call__(self, step: int, total: int | None, seconds: float) -> None:
        print(f"{self.label}: step {step}/{total or '?'} ({seconds:.2f} s)", file=self.stream, flush=True)
