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


# -- SafetensorsFile.iter_tensors reads the next few tensors side by side --------------------------
def _file(tmp_path, count=12):
    from safetensors.torch import save_file

    tensors = {f"t{i:02d}": torch.arange(i * 1000, i * 1000 + 257 * (i + 1), dtype=torch.float32) for i in range(count)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("prefetch", [1, 2, 4])
def test_prefetched_reads_come_in_data_order_with_their_bytes(tmp_path, monkeypatch, prefetch):
    from diffgen import safetensors_header

    monkeypatch.setattr(safetensors_header, "PREFETCH_TENSORS", prefetch)
    path, tensors = _file(tmp_path)
    got = list(safetensors_header.SafetensorsFile(path).iter_tensors())
    assert [n for n, _ in got] == sorted(tensors)  # save_file writes in name order
    assert all(torch.equal(t, tensors[n]) for n, t in got)


def test_a_truncated_file_fails_at_the_tensor_it_cuts_after_the_ones_before(tmp_path):
    from diffgen import safetensors_header
    from diffgen.errors import CheckpointError

    path, tensors = _file(tmp_path)
    reader = safetensors_header.SafetensorsFile(path)  # header checked against the whole file
    last = reader.tensors["t11"]
    with open(path, "r+b") as f:
        f.truncate(last.start + 8)  # the last tensor loses all but 8 bytes
    names = []
    with pytest.raises(CheckpointError, match="short read") as err:
        for name, t in reader.iter_tensors():
            assert torch.equal(t, tensors[name])
            names.append(name)
    assert names == sorted(tensors)[:-1] and "t11" in str(err.value)


def test_stopping_early_leaves_no_read_running(tmp_path, monkeypatch):
    from diffgen import safetensors_header

    started, finished = [], []
    real = safetensors_header.read_tensor

    def slow_read(f, info, pinned=None, check=None):
        started.append(info.name)
        threading.Event().wait(0.05)
        out = real(f, info, pinned, check)
        finished.append(info.name)
        return out

    monkeypatch.setattr(safetensors_header, "read_tensor", slow_read)
    path, _ = _file(tmp_path)
    stream = safetensors_header.SafetensorsFile(path).iter_tensors()
    next(stream)
    stream.close()  # the file closes only after every read in flight has ended
    assert sorted(started) == sorted(finished) and len(started) < 12


def test_prefetch_threads_keep_the_callers_pinned_setting(tmp_path, monkeypatch):
    from diffgen import safetensors_header

    seen = []
    real = safetensors_header.read_tensor
    monkeypatch.setattr(safetensors_header, "read_tensor",
                        lambda f, info, pinned=None, check=None: (seen.append(pinned), real(f, info, False))[1])
    path, _ = _file(tmp_path, 4)
    with pinned_reads(True):
        list(safetensors_header.SafetensorsFile(path).iter_tensors())
    assert seen == [True] * 4


def _read_all(path, queue):
    from diffgen import safetensors_header

    queue.put(len(list(safetensors_header.SafetensorsFile(path).iter_tensors())))


def test_a_forked_child_reads_with_its_own_threads(tmp_path):
    import multiprocessing

    from diffgen import safetensors_header

    path, tensors = _file(tmp_path)
    list(safetensors_header.SafetensorsFile(path).iter_tensors())  # the parent's pools exist now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_all, args=(path, queue))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung on the parent's thread pools"
    assert queue.get(timeout=5) == len(tensors)


# -- on the CPU the reader checks for NaN and infinity as it reads -------------------------------------
@pytest.mark.parametrize("where", [0, 5_000_000, -1])  # the first, a middle (a later check step), the last value
def test_a_checked_read_refuses_a_nan_naming_tensor_and_file(tmp_path, monkeypatch, where):
    from safetensors.torch import save_file

    from diffgen import safetensors_header
    from diffgen.errors import LoadError

    monkeypatch.setattr(safetensors_header, "READ_CHUNK", 8 << 20)  # several chunks, several check steps each
    monkeypatch.setattr(safetensors_header, "CHECK_STEP", 1 << 20)
    bad = torch.zeros(6_000_000, dtype=torch.bfloat16)
    bad[where] = float("nan")
    path = tmp_path / "w.safetensors"
    save_file({"a.ok": torch.ones(10), "b.bad": bad, "c.ints": torch.full((4,), -1, dtype=torch.int32)}, path)
    reader = safetensors_header.SafetensorsFile(path)
    with safetensors_header.checked_reads(True), pytest.raises(LoadError, match=r"'b.bad' in .*w.safetensors holds NaN"):
        list(reader.iter_tensors())
    assert len(list(reader.iter_tensors())) == 3  # unchecked reads load it


def test_checked_reads_mark_what_they_checked_and_the_loader_skips_it(tmp_path):
    from safetensors.torch import save_file

    from diffgen import safetensors_header
    from diffgen.finite import CHECKED_AT_READ, FiniteChecks

    path = tmp_path / "w.safetensors"
    save_file({"f": torch.randn(100), "i": torch.arange(5)}, path)
    with safetensors_header.checked_reads(True):
        got = dict(safetensors_header.SafetensorsFile(path).iter_tensors())
    assert getattr(got["f"], CHECKED_AT_READ, False) and not hasattr(got["i"], CHECKED_AT_READ)
    checks = FiniteChecks(True, "cpu")
    poisoned = got["f"].clone()
    poisoned[3] = float("inf")
    setattr(poisoned, CHECKED_AT_READ, True)  # marked: the loader trusts the reader's verdict
    checks.submit("f", poisoned, "x")
    checks.submit("fresh", torch.tensor([float("nan")]), "x")  # unmarked (a repack's new tensor): checked
    with pytest.raises(Exception, match="'fresh' in x holds NaN"):
        checks.finish()
    checks.close()
