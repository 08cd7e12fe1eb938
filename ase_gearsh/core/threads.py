"""BLAS thread settings shared by the steps of many small dense products."""

from __future__ import annotations

import contextlib

__all__ = ["single_threaded_blas"]


def single_threaded_blas():
    """Context limiting BLAS to one thread (threadpoolctl, when installed).  For many
    small products or eigenproblems BLAS threads are overhead, and on a busy machine
    spinning BLAS threads slow everything ~3x."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
