"""Optional numba compilation of the small array kernels of the core and the model.

numba is an optional dependency (the ``model`` extra): :func:`compiled` returns the
kernel compiled with numba (cached on disk, GIL released, so it can run beside JAX or
another thread), or None when numba is not installed; callers then use a numpy path
that gives the same values.
"""

from __future__ import annotations

__all__ = ["compiled"]

_CACHE: dict = {}


def compiled(fn):
    """``fn`` compiled with ``numba.njit(cache=True, nogil=True)`` (once per process),
    or None without numba."""
    if fn not in _CACHE:
        try:
            import numba
        except ImportError:
            _CACHE[fn] = None
        else:
            _CACHE[fn] = numba.njit(cache=True, nogil=True)(fn)
    return _CACHE[fn]
