"""Opt-in tuning of glibc's allocator for runs that predict large structures.

By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns
it to the system when it is freed, so each new structure's arrays (H, S and their
scratch, gigabytes at device scale) are new pages that the kernel must fault in and
zero again.  :func:`keep_freed_memory` makes this process serve all allocations from
the heap and keep freed memory for reuse.  Measured with ``benchmarks/device_scale.py
--keep-freed-memory`` (3999 atoms, 2 cores, medians of 3 per process): H and S of a new
structure in 12.3-14.0 s instead of 13.4-16.5 s; the cost is that the resident memory
stays at its peak until the process ends (6.1-6.7 against 4.9 GiB there).
Process-wide, so it is never set by importing the package: call it (or pass
``gearsh predict --keep-freed-memory``) in a process that predicts structure after
structure.  Of the processes above, one set a trim threshold of 64 GiB through the
environment (13.64 and 13.41 s), the others called this function, whose threshold is
mallopt's limit of 2 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory", "KEEP_FREED_ENV"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
# mallopt takes a C int: free memory at the heap's top beyond 2 GiB is still given back
_TRIM = 2**31 - 1

# the same settings for processes started later (glibc reads them at start-up)
KEEP_FREED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM)}


def keep_freed_memory(children: bool = False) -> bool:
    """Tell glibc's malloc to serve allocations from the heap (no ``mmap``) and keep up
    to 2 GiB of freed memory at the heap's top for the next ones.  ``children``: also
    put the equivalent environment variables in ``os.environ``, for the processes this
    one starts afterwards (``gearsh predict``'s batch workers).  Returns False, with
    nothing changed, where the C library is not glibc (macOS, musl) or refuses."""
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
    if mallopt(_M_MMAP_MAX, 0) != 1:
        return False
    if mallopt(_M_TRIM_THRESHOLD, _TRIM) != 1:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)  # back to glibc's default
        return False
    if children:
        os.environ.update(KEEP_FREED_ENV)
    return True
