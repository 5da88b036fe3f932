"""Read ahead and write behind, so the device never waits on CPU work.

`read_ahead` runs an iterator (reading, tokenizing, windowing) in a background thread a bounded number of items
ahead of its consumer; `WriteBehind` runs the shard writing (tables, zstd, sha256, fsync, the rank record) in
another, in submission order. Both only move work in time: the items, their order and every byte written are
those of the same loop run in line (`enabled=False`), which the tests compare. Errors surface in the main
thread, with their own type and traceback: from `read_ahead` where the failing item would have been consumed,
from `WriteBehind` at the next `submit` or at the end.

Threads suffice: the tokenizer (Rust), Parquet/zstd (Arrow), hashing, fsync and the device all run without the GIL.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_POLL = 0.1  # seconds between checks of the stop flag while a queue is full / empty
STOP_WAIT = 1.0  # seconds a consumer that broke off (Ctrl-C, an error) waits for the producer's current item


def read_ahead(items: Iterator[T], depth: int, enabled: bool = True) -> Iterator[T]:
    """`items`, produced in a background thread at most `depth` items ahead of the consumer."""
    if not enabled:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(msg) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for it in items:
                if not put((True, it)):
                    return
            put((False, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=work, name="rpt-read-ahead", daemon=True)
    thread.start()
    ended = False  # the producer sent its end or its error: it is about to return
    try:
        while True:
            ok, it = q.get()
            if ok:
                yield it
            elif it is None:
                ended = True
                return
            else:
                ended = True
                raise it
    finally:  # the consumer stopped (done, an error, or it broke off): stop the producer before anything closes
        stop.set()
        # one that broke off does not wait for a slow item (a whole pool being read) to stop: Ctrl-C or an error
        # reaches the caller promptly; the daemon thread stops at its next put and its items are dropped
        thread.join(None if ended else STOP_WAIT)


class WriteBehind:
    """Calls `fn(*args)` for each `submit`, in order, in one background thread, at most `depth` calls queued.
    As a context manager, an exit waits for every call submitted (as the loop in line would have made them before
    the error), then raises the first error of a call; an exit on an error of its own keeps that error (a call
    that fails then, e.g. a disk that is full, leaves its shard to be redone on resume, as after a kill)."""

    def __init__(self, fn: Callable, depth: int = 2, enabled: bool = True):
        self.fn, self.enabled = fn, enabled
        self.error: BaseException | None = None
        if not enabled:
            return
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="rpt-write-behind", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            try:
                args = self.q.get(timeout=_POLL)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if args is None or self.stop.is_set() or self.error is not None:
                return
            try:
                self.fn(*args)
            except BaseException as e:  # noqa: BLE001 - raised in the main thread
                self.error = e
                return

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def submit(self, *args) -> None:
        if not self.enabled:
            self.fn(*args)
            return
        while True:
            self._raise()
            try:
                self.q.put(args, timeout=_POLL)
                return
            except queue.Full:
                continue

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        try:
            while self.thread.is_alive():
                try:
                    self.q.put(None, timeout=_POLL)
                    break
                except queue.Full:
                    continue
            self.thread.join()
        except BaseException:  # interrupted while waiting (Ctrl-C): drop what was not started
            self.stop.set()
            self.thread.join()
            raise
        if exc_type is None:
            self._raise()
