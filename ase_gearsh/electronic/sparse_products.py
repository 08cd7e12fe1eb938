"""Sparse (CSR) x dense block products on all cores.

scipy's ``csr @ dense`` runs on one core; at device scale (S with 131 M non-zeros
times a block of 32 vectors) it is as costly as a solve with a sparse factor.
:func:`csr_times_block` runs the same product row-parallel in numba threads (same
numbers: each output row is summed in the CSR order), and falls back to scipy when
numba is missing or the block is small.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["csr_times_block"]

MIN_WORK = 2_000_000  # non-zeros x columns below which scipy is used (no thread start-up)

try:
    import numba
except ImportError:  # optional dependency (extra 'gpaw')
    numba = None

if numba is not None:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _kernel(indptr, indices, data, X, out):  # pragma: no cover - compiled
        n, m = out.shape
        for i in numba.prange(n):
            for c in range(m):
                out[i, c] = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                a = data[p]
                j = indices[p]
                for c in range(m):
                    out[i, c] += a * X[j, c]


def csr_times_block(A, X: np.ndarray) -> np.ndarray:
    """``A @ X`` for a real sparse matrix A (n, n') and a real block X (n', m)."""
    if (
        numba is None
        or X.ndim != 2
        or A.dtype != np.float64
        or X.dtype != np.float64
        or A.nnz * X.shape[1] < MIN_WORK
    ):
        return np.asarray(A @ X)
    A = A if sp.isspmatrix_csr(A) or isinstance(A, sp.csr_array) else sp.csr_matrix(A)
    out = np.empty((A.shape[0], X.shape[1]))
    _kernel(A.indptr, A.indices, A.data, np.ascontiguousarray(X), out)
    return out
