"""Opt-in tuning of glibc's allocator for runs that predict large structures.

By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns
it to the system when it is freed, so each new structure's arrays (H, S and their
scratch, gigabytes at device scale) are new pages that the kernel must fault in and
zero again.  :func:`keep_freed_memory` makes this process serve all allocations from
the heap and keep freed memory for reuse.  Measured with ``benchmarks/device_scale.py
--keep-freed-memory`` (3999 atoms, 2 cores, medians of 3 per process): H and S of a new
structure in 12.3-14.0 s instead of 13.4-16.5 s; the cost is that the resident memory
stays at its peak until the process ends (6.1-6.7 against 4.9 GiB there).  Process-wide, so it is never set
by importing the package: call it (or pass ``gearsh predict --keep-freed-memory``) in a
process that predicts structure after structure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory", "KEEP_FREED_ENV"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM = 1 << 40  # never give the heap's top back to the system

# the same settings for processes started later (glibc reads them at start-up)
KEEP_FREED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM)}


def keep_freed_memory(children: bool = True) -> bool:
    """Tell glibc's malloc to serve allocations from the heap (no ``mmap``) and keep
    freed memory for the next ones.  ``children``: also put the equivalent environment
    variables in ``os.environ`` for processes started after this call (batch workers).
    Returns False, changing nothing, where the C library is not glibc (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt takes an int: the trim threshold is capped at the largest one
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, min(_TRIM, 2**31 - 1)) == 1 and ok
    if ok and children:
        os.environ.update(KEEP_FREED_ENV)
    return ok
