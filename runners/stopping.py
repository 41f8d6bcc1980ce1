"""Stopping a training run cleanly on Ctrl+C or SIGTERM, and its loader workers with it.

This module owns what the signals do while the training loop runs: the first one asks the loop
to end after the iteration in progress (announced at once, even while the main thread is inside
a long network step), a second one stops at once except during a save; the loader's worker
processes ignore both (a terminal or a scheduler sends them to every process of the run) and are
stopped by the main process when the loop ends.
"""
import contextlib
import logging
import signal
import socket
import threading

from data.dataset_jpeg import worker_init_fn

__all__ = ["STOP_SIGNALS", "StopRequest", "loader_worker_init", "signals_held", "stop_workers"]

logger = logging.getLogger("fbcnn.runners.training")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SIGNAL_NAMES = {signal.SIGINT: "Ctrl+C (SIGINT)", signal.SIGTERM: "SIGTERM"}


def loader_worker_init(worker_id):
    """A training loader worker ignores Ctrl+C and SIGTERM: a terminal or a scheduler sends
    them to every process of the run, and a worker they killed would make the loader raise in
    the main process, which instead stops the workers itself once its iteration is done. The
    signals were held (blocked) since the worker started (`signals_held`); ignoring them drops
    any that came meanwhile."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # the main process's, inherited through fork
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    worker_init_fn(worker_id)


@contextlib.contextmanager
def signals_held():
    """Block SIGINT and SIGTERM in this thread for the block: the loader workers started in it
    inherit the block until `loader_worker_init` ignores the signals, and the main process gets
    any that came once the block ends."""
    if (not hasattr(signal, "pthread_sigmask")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_workers(batches):
    """Shut down the loader iterator's worker processes now: as the DataLoader does (it asks
    them, then sends SIGTERM, which they ignore), then SIGKILL for any still running. Reached
    through DataLoader internals; an iterator without workers has nothing to stop."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


class StopRequest:
    """Ctrl+C and SIGTERM while the loop runs (main thread only; elsewhere a no-op).

    The first signal sets `requested`; the loop ends after the iteration in progress. It is
    announced at once by a thread woken through `signal.set_wakeup_fd`, which the signal
    writes to even while the main thread is inside a long network step that does not return
    to Python (where Python's own handler waits). A second signal raises KeyboardInterrupt
    while `interruptible` (the loop's body outside saves), or when the save ends.
    """

    def __init__(self, announce=True):
        self.announce = announce  # rank 0 alone says it, in a distributed run
        self.requested = threading.Event()
        self.interruptible = False
        self.pending = False  # a second signal came while not interruptible
        self.count = 0
        self._active = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="fbcnn-stop", daemon=True)
        self._watcher.start()
        self._active = True
        return self

    def __exit__(self, *exc):
        self.interruptible = False
        if not self._active:
            return
        self._active = False
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")  # wakes the watcher to end
        self._watcher.join(timeout=5)
        self._reader.close()
        self._writer.close()

    def _on_signal(self, signum, frame):
        self.count += 1
        self.requested.set()
        if self.count > 1:
            if self.interruptible:
                raise KeyboardInterrupt
            self.pending = True

    def _watch(self):
        announced = False
        while True:
            data = self._reader.recv(64)
            if not data or 0 in data:
                return
            names = [_SIGNAL_NAMES[n] for n in data if n in _SIGNAL_NAMES]
            if names and not announced:
                announced = True
                self.requested.set()
                if self.announce:
                    logger.warning("%s: stopping after this iteration (a second Ctrl+C or "
                                   "SIGTERM stops at once)", names[0])

    @contextlib.contextmanager
    def critical(self):
        """A block a second signal does not cut short (a save): it takes effect after it."""
        interruptible, self.interruptible = self.interruptible, False
        try:
            yield
        finally:
            self.interruptible = interruptible
        if self.pending and interruptible:
            self.pending = False
            raise KeyboardInterrupt
