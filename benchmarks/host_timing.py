"""Timing helpers shared by the benchmarks.

host_us: the host cost of one call. On tiny shapes the GPU finishes each kernel long before the
next is enqueued, so the wall time per call over many calls is what the host spends issuing it
(Python, dispatch, the launcher).
graph_ms: the GPU time of one call, from CUDA-graph replays of ``calls`` calls (no launch cost).
event_ms: the time between CUDA events around one call (launch cost included).
"""

from __future__ import annotations

import statistics
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


def graph_ms(fn, calls: int = 20, replays: int = 50) -> float:
    """Milliseconds per call of ``fn``: the median over ``replays`` replays of a CUDA graph that
    holds ``calls`` calls, after warm-up calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(5):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return statistics.median(event_ms(graph.replay) / calls for _ in range(replays))


def graph_us(fn) -> float:
    """graph_ms in microseconds, median of 5 replays of 20 calls (the per-kernel benchmarks)."""
    return graph_ms(fn, calls=20, replays=5) * 1e3


def event_ms(fn) -> float:
    """Milliseconds between CUDA events recorded before and after ``fn()`` (synchronizes)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)
