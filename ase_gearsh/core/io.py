"""Atomic file writes, output folders written as a unit, locks against concurrent
writers, and figures drawn without pyplot (no process-wide state).

A write goes to a temporary file in the target's folder, is flushed to disk and
renamed over the target: a kill at any point leaves the old file or the complete
new one, never a mix.  An output *folder* is built under a temporary name and
renamed into place when complete (:func:`output_folder`).  :class:`OutputLock`
holds an advisory lock (``flock``) for the duration of a write; the kernel drops it
when the process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import GearsHError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "OutputLock",
    "OutputBusyError",
    "OutputPathError",
    "check_output_folder",
    "output_folder",
    "new_figure",
    "save_figure",
]


class OutputBusyError(GearsHError, RuntimeError):
    """Another process is writing the same output."""


class OutputPathError(GearsHError, ValueError):
    """An output path that cannot be used (a file in the way, or it exists)."""


def atomic_write(path, write: Callable, exclusive: bool = False) -> None:
    """Call ``write(fh)`` on a temporary binary file, then rename it to ``path``.

    ``exclusive``: never replace an existing ``path`` (``FileExistsError``, also when
    another process created it meanwhile); the temporary file is then removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if path exists
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputLock:
    """Exclusive advisory lock on an output path, held by this process.

    The lock is the hidden file ``.<name>.lock`` beside ``target``.  ``acquire``
    fails at once with :class:`OutputBusyError` (naming the holder's process id)
    when another process holds it.  The kernel releases it when the process exits
    or is killed, so a stale lock file is harmless: it is simply locked again.
    """

    def __init__(self, target, what: str = "output"):
        target = Path(target)
        self.target = target
        self.path = target.parent / f".{target.name}.lock"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputBusyError(
                    f"{self.target} is being written by another process (pid {holder}; "
                    f"lock {self.path}): wait for it to finish, or choose another {self.what}"
                ) from None
            # the holder before us may have removed the file after we opened it
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_folder(path, overwrite: bool = False, option: str = "--overwrite") -> Path:
    """An output folder that can be written: not a file, not under a file, and
    (unless ``overwrite``) not already there.  Raises :class:`OutputPathError`."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == path else f"lies under {parent}, which is"
            raise OutputPathError(f"output folder {path} {where} a file; expected a folder")
        if parent.exists():
            break
    if path.exists() and not overwrite:
        raise OutputPathError(
            f"output folder {path} already exists; choose another or pass {option} to replace it"
        )
    return path


@contextlib.contextmanager
def output_folder(path, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Build an output folder as a unit: yields a temporary folder beside ``path``,
    renamed to ``path`` when the block ends without error (replacing an existing
    folder only with ``overwrite``); on any error the temporary folder is removed
    and ``path`` is untouched.  Concurrent writers of ``path`` are refused
    (:class:`OutputLock`)."""
    path = check_output_folder(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(path, what):
        check_output_folder(path, overwrite)  # again, now that we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would give
        try:
            yield tmp
            old = None
            if path.exists():
                old = Path(
                    tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
                )
                os.replace(path, old / path.name)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def new_figure(nrows: int = 1, ncols: int = 1, figsize=(7, 4)):
    """``(fig, axes)`` from :class:`matplotlib.figure.Figure`: no pyplot, no global
    backend switch, nothing left open in the caller's process."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols)


def save_figure(fig, path, dpi: int = 120) -> None:
    """Render ``fig`` (PNG unless the suffix says otherwise) and write it atomically."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
