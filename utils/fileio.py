"""Atomic file writes: a file appears complete under its name, or not at all.

This module owns how the project writes files that other runs or people read (checkpoints,
restored images, downloads, summaries): the bytes go to a temporary file beside the target,
named `.<name>.tmp-<pid>-<thread>`, which is optionally flushed and fsynced and then moved into
place with `os.replace` (atomic within a filesystem), or, where an existing file must never be
replaced, with `os.link` (which refuses an existing target). On any failure (a full disk, a
quota, an interruption) the temporary file is removed, the target keeps its previous content,
and the error is a `WriteError` naming the file and the reason. A process killed outright
(SIGKILL, power loss) can leave a temporary file behind, never a partial target;
`remove_stale_temporaries` clears them.

Paths in messages go through `display_path`: file names that are not valid UTF-8 (surrogate
escapes from `os.listdir`, bytes paths) show as \\xNN escapes, printable on any terminal.
"""
import contextlib
import os
import re
import socket
import threading

try:
    import fcntl  # POSIX; elsewhere folders are used without the lock
except ImportError:  # pragma: no cover
    fcntl = None

from utils.errors import UserError

__all__ = ["WriteError", "printable", "display_path", "make_folder", "folder_lock",
           "atomic_write", "atomic_write_bytes", "temporary_name", "is_temporary_name",
           "remove_stale_temporaries"]

_TMP_MARK = ".tmp-"


class WriteError(UserError):
    """A file could not be written (full disk, permissions, ...); nothing partial was left."""


def temporary_name(path):
    """The temporary file `atomic_write` uses for `path` in this process and thread."""
    folder, name = os.path.split(os.fsdecode(path))
    return os.path.join(folder, f".{name}{_TMP_MARK}{os.getpid()}-{threading.get_ident()}")


_TMP_NAME = re.compile(r"\..+" + re.escape(_TMP_MARK) + r"\d+-\d+")


def is_temporary_name(name):
    """Whether a file name is one of `atomic_write`'s temporary files, `.<name>.tmp-<pid>-<tid>`
    exactly: a user's own dotfiles and notes (`.DS_Store`, `.notes.tmp-old`) never are."""
    return _TMP_NAME.fullmatch(name) is not None


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def printable(text):
    """`text` with any surrogate-escaped bytes (from names that are not UTF-8) as \\xNN escapes,
    so it can be written to a strict UTF-8 stream or log file."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that os.fsdecode would never produce
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def display_path(path):
    """`path` (str, bytes or path-like) as printable text: bytes that are not UTF-8 appear as
    \\xNN escapes."""
    return printable(os.fsdecode(path))


class _RecordingFile:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports one as a
    RuntimeError without the reason."""

    def __init__(self, f):
        self._f = f
        self.error = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _link_new(tmp, path):
    """Move `tmp` to `path` unless `path` exists (FileExistsError), atomically where the file
    system has hard links: `os.link` refuses an existing target, a rename would replace it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def make_folder(folder):
    """`os.makedirs(folder, exist_ok=True)`, or a WriteError naming the folder and the reason
    (a file where a folder should be, permissions, a read-only file system)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        path = os.path.abspath(folder)
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)  # the nearest part of the path that exists
        if not os.path.isdir(path):
            reason = ("a file of that name is in the way" if path == os.path.abspath(folder)
                      else f"{display_path(path)} is a file, not a folder")
        raise WriteError(f"{display_path(folder)}: cannot create this folder ({reason})") from None
    return folder


def atomic_write(path, write, fsync=True, replace=True):
    """Create or replace `path` atomically; `write(binary_file)` fills a temporary file.

    `fsync` makes the content durable before the rename (checkpoints); without it the rename is
    still atomic for other processes, which is enough for outputs that can be made again.
    `replace=False` never replaces an existing `path`, not even one that appears while `write`
    runs: FileExistsError then, and nothing is written. The folder of `path` is created.
    Raises WriteError (naming `path`) when the operating system refuses a write; an exception
    of `write` itself (other than a failed write to the file) propagates unchanged.
    """
    path = os.fsdecode(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temporary_name(path)
    recorder = exists = None
    try:
        make_folder(folder)
        with open(tmp, "wb") as f:
            recorder = _RecordingFile(f)
            write(recorder)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                _link_new(tmp, path)
            except FileExistsError as exc:
                exists = exc  # the target itself exists: not a write error
        if fsync and exists is None:
            _fsync_dir(folder)
    except WriteError:
        raise
    except Exception as exc:
        if not isinstance(exc, OSError):
            if recorder is None or recorder.error is None:
                raise
            exc = recorder.error
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise WriteError(f"{display_path(path)}: cannot write ({reason}); the file was not written "
                         f"or keeps its previous content") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    if exists is not None:
        raise exists
    return path


def atomic_write_bytes(path, data, fsync=True, replace=True):
    """`atomic_write` of a bytes-like object."""
    return atomic_write(path, lambda f: f.write(data), fsync=fsync, replace=replace)


def remove_stale_temporaries(folder):
    """Delete the temporary files an interrupted `atomic_write` left in `folder`; their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(n for n in os.listdir(folder) if is_temporary_name(n))
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


@contextlib.contextmanager
def folder_lock(folder, name, busy, hint, remove=False):
    """Hold the lock file `folder/name` for the block: a second process that asks for it
    meanwhile gets a UserError `"<folder>: <busy> (pid N on HOST); <hint>"`. The lock is
    released when the holder exits, however it ends; the file stays, holding the last holder's
    name, unless `remove` (then it is deleted as the block ends, still held, and only a killed
    holder leaves it, unlocked). POSIX only; a no-op elsewhere."""
    make_folder(folder)
    if fcntl is None:
        yield
        return
    path = os.path.join(folder, name)
    f = open(path, "a+", encoding="utf-8")
    held = False
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{folder}: {busy} ({holder}); {hint}") from None
        held = True
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        if held and remove:
            with contextlib.suppress(OSError):
                os.remove(path)
        f.close()  # releases the lock
