"""diffgen.readahead: the loader's stream on a worker thread, bounded in bytes, errors passed through."""

import threading

import pytest
import torch

from diffgen.errors import LoadError
from diffgen.readahead import read_ahead
from diffgen.safetensors_header import _PINNED, pinned_reads


def _items(n, size=16):
    for i in range(n):
        yield f"t{i}", torch.full((size,), float(i))


@pytest.mark.parametrize("budget", [0, 1, 64, 1 << 20])
def test_same_items_in_order(budget):
    got = [(name, t.clone()) for name, t in read_ahead(_items(20), budget)]
    want = list(_items(20))
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))


def test_budget_bounds_how_far_the_worker_runs():
    produced, size = [], 64 * 4  # 64 float32 per tensor
    gate = threading.Event()

    def stream():
        for i in range(50):
            produced.append(i)
            yield f"t{i}", torch.zeros(64)

    it = read_ahead(stream(), budget=3 * size)
    next(it)
    gate.wait(0.3)  # let the worker run as far as the budget allows
    # Taken: 1. Ahead: at most 3 tensors within the budget, plus the one the worker holds waiting.
    assert len(produced) <= 1 + 3 + 1
    assert len(list(it)) == 49


def test_an_error_in_the_stream_reaches_the_consumer_after_the_items_before_it():
    def stream():
        yield from _items(3)
        raise LoadError("tensor 't3' in shard-2.safetensors is corrupt")

    seen = []
    with pytest.raises(LoadError, match="t3.*shard-2"):
        for name, _ in read_ahead(stream(), 1 << 20):
            seen.append(name)
    assert seen == ["t0", "t1", "t2"]


def test_a_consumer_that_stops_early_closes_the_stream_and_the_worker():
    closed = threading.Event()

    def stream():
        try:
            for i in range(10_000):
                yield f"t{i}", torch.zeros(4)
        finally:
            closed.set()

    it = read_ahead(stream(), 1 << 10)
    for _ in range(3):
        next(it)
    it.close()
    assert closed.is_set()
    assert not any(t.name == "diffgen-read-ahead" for t in threading.enumerate())


def test_the_worker_sees_the_callers_pinned_reads_setting():
    def stream():
        yield "flag", torch.tensor(float(_PINNED.get()))

    with pinned_reads(True):
        (_, flag), = list(read_ahead(stream(), 1 << 10))
    assert flag.item() == 1.0
    assert _PINNED.get() is False
