"""Run a tensor stream on a worker thread, a bounded number of bytes ahead of its consumer.

The loader's stream reads a tensor from disk (``os.preadv`` releases the GIL) and passes it
through the plugins' repacks; the consumer copies it to the device, checks it and processes
finished layers. Done in turn, each waits for the other; with the stream one or two tensors
ahead, reads overlap copies. ``budget`` bounds the bytes read but not yet taken, so host memory
stays near the largest tensor plus the budget.

Errors raised by the stream (a corrupt file, a plugin's LoadError) reach the consumer unchanged,
at the position they happened. When the consumer stops early (its own error, or it was closed),
the worker is told to stop and the stream is closed on the worker's thread.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import Iterator

import torch

_DONE = object()


def read_ahead(stream: Iterator[tuple[str, torch.Tensor]], budget: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``stream``'s items, produced on a worker thread at most ``budget`` bytes ahead
    (one item is always allowed, however large). ``budget <= 0`` iterates in the caller's thread."""
    if budget <= 0:
        yield from stream
        return
    ready: deque = deque()
    lock = threading.Condition()
    state = {"ahead": 0, "stop": False}

    def produce() -> None:
        item = _DONE
        try:
            for item in stream:
                size = item[1].numel() * item[1].element_size()
                with lock:
                    while state["ahead"] > 0 and state["ahead"] + size > budget and not state["stop"]:
                        lock.wait()
                    if state["stop"]:
                        break
                    state["ahead"] += size
                    ready.append((item, size))
                    lock.notify_all()
            item = _DONE
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            item = exc
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            with lock:
                ready.append((item, 0))
                lock.notify_all()

    # The worker sees the caller's context variables (pinned reads, for one).
    worker = threading.Thread(target=contextvars.copy_context().run, args=(produce,),
                              name="diffgen-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            with lock:
                while not ready:
                    lock.wait()
                item, size = ready.popleft()
                state["ahead"] -= size
                lock.notify_all()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        with lock:
            state["stop"] = True
            ready.clear()
            lock.notify_all()
        worker.join()
