"""Host cost of one call, for the benchmarks that probe launch overhead.

On tiny shapes the GPU finishes each kernel long before the next is enqueued, so the wall time per
call over many calls is what the host spends issuing it (Python, dispatch, the launcher).
"""

from __future__ import annotations

import time

import torch


def host_us(fn, n: int, warmup: int) -> float:
    """Microseconds per call of ``fn`` over ``n`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6
