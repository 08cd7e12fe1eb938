"""Atomic file writes and figures drawn without pyplot (no process-wide state).

A write goes to a temporary file in the target's folder, is flushed to disk and
renamed over the target: a kill at any point leaves the old file or the complete
new one, never a mix.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "new_figure", "save_figure"]


def atomic_write(path, write: Callable) -> None:
    """Call ``write(fh)`` on a temporary binary file, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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
