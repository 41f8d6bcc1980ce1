"""Overlapping the test runner's stages with the network: executors and stage clocks.

This module owns how the runner keeps the network busy: JPEG degradations are prepared a few
images ahead on a thread pool, metrics and PNG encoding run on the same pool, and the steps whose
order shows (log lines, collecting scores) run on one finishing thread in submission order, so
logs, scores and files come out exactly as in a serial run. OpenCV and NumPy release the GIL in
the heavy calls, so the threads overlap with the network's compute.
`InlineExecutor` runs everything in the caller's thread: the serial path, same code.
"""
import collections
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

__all__ = ["InlineExecutor", "StageClock", "Pipeline"]


class InlineExecutor:
    """An executor that runs each task at once, in the calling thread."""

    def submit(self, fn, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # delivered by result(), as a thread pool would
            future.set_exception(exc)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


class StageClock:
    """Seconds spent per named stage, summed over threads (so stages may add up to more than
    the wall time when they overlap)."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[stage] += elapsed


class Pipeline:
    """Prepare ahead and work on `workers` threads, finish in order on one more thread.

    `workers=0` runs every task inline, in order: the serial reference. Use as a context
    manager; on leaving, pending work is finished (or cancelled after an error).
    """

    def __init__(self, workers):
        if workers < 0:
            raise ValueError(f"workers={workers}: must be 0 (serial) or more")
        self.lookahead = 2 * workers  # prepared inputs (and unfinished outputs) held at most
        self._pool = ThreadPoolExecutor(workers, "prepare") if workers else InlineExecutor()
        self._finish = ThreadPoolExecutor(1, "finish") if workers else InlineExecutor()
        self._pending = collections.deque()

    def map_prepared(self, fn, items):
        """Yield `fn(item)` for each item, in order, computed up to `lookahead` items ahead."""
        items = iter(items)
        ahead = collections.deque()
        for item in items:
            ahead.append(self._pool.submit(fn, item))
            if len(ahead) > self.lookahead:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def submit(self, fn, *args):
        """Start `fn(*args)` on the pool, in any order; returns its Future (for `finish` tasks
        to wait on)."""
        return self._pool.submit(fn, *args)

    def finish(self, fn, *args):
        """Run `fn(*args)` on the finishing thread after every task finished before it."""
        self._pending.append(self._finish.submit(fn, *args))
        while len(self._pending) > max(self.lookahead, 1):
            self._pending.popleft().result()  # bounds memory, and raises a task's error here

    def drain(self):
        """Wait for every finishing task; re-raises the first error."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.drain()
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        self._finish.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False
