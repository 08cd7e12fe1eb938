"""Sparse (CSR) x dense block products on all cores.

scipy's ``csr @ dense`` runs on one core; at device scale (S with 131 M non-zeros
times a block of 32 vectors) it is as costly as a solve with a sparse factor.
:func:`csr_times_block` runs the same product row-parallel in numba threads (same
numbers: each output row is summed in the CSR order), and falls back to scipy when
numba is missing or the block is small.

Each non-zero reads one row of the block (32 vectors: 256 bytes from anywhere in it).
The rows of one atom in an LCAO H usually share their column list (whole atom-pair
blocks), so :class:`BlockProduct` finds runs of consecutive rows with the same columns
once per matrix and reads each block row once per run; the sums are the same, in the
same order.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["BlockProduct", "csr_times_block", "times"]

MIN_WORK = 2_000_000  # non-zeros x columns below which scipy is used (no thread start-up)
_REAL = (np.dtype(np.float64), np.dtype(np.float32))

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

    @numba.njit(cache=True, nogil=True)
    def _row_runs(indptr, indices, most):  # pragma: no cover - compiled
        """Starts of runs of consecutive rows with equal column lists (at most ``most``
        rows each), and the run ends: (n_runs + 1,)."""
        n = len(indptr) - 1
        starts = np.empty(n + 1, np.int64)
        starts[0] = 0
        k = 1
        r0 = 0
        for r in range(1, n):
            same = r - r0 < most and indptr[r + 1] - indptr[r] == indptr[r0 + 1] - indptr[r0]
            if same:
                a, b = indptr[r0], indptr[r]
                for p in range(indptr[r + 1] - indptr[r]):
                    if indices[a + p] != indices[b + p]:
                        same = False
                        break
            if not same:
                starts[k] = r
                k += 1
                r0 = r
        starts[k] = n
        return starts[: k + 1].copy()

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _grouped_kernel(runs, indptr, indices, data, X, out):  # pragma: no cover - compiled
        m = out.shape[1]
        for g in numba.prange(len(runs) - 1):
            r0, r1 = runs[g], runs[g + 1]
            for r in range(r0, r1):
                for c in range(m):
                    out[r, c] = 0.0
            base = indptr[r0]
            for p in range(indptr[r0 + 1] - base):
                j = indices[base + p]
                for r in range(r0, r1):
                    a = data[indptr[r] + p]
                    for c in range(m):
                        out[r, c] += a * X[j, c]


class BlockProduct:
    """``A @ X`` for one real CSR matrix A and many blocks X (a Chebyshev recursion):
    runs of rows with the same columns are found once, here, and each run reads a row
    of X once per column (the same numbers as :func:`csr_times_block`).  Falls back to
    :func:`csr_times_block` without numba or for a complex or integer matrix, and to
    ``A @ X`` for a complex block.  A float32 matrix times a float32 block runs in float32
    (the single-precision KPM steps); any other real block in float64."""

    MAX_RUN = 32  # rows per run (load balance across threads)

    def __init__(self, A):
        self.A = A
        self.runs = None
        if numba is not None and getattr(A, "dtype", None) in _REAL:
            A = A if sp.isspmatrix_csr(A) or isinstance(A, sp.csr_array) else sp.csr_matrix(A)
            self.A = A
            runs = _row_runs(A.indptr, A.indices, self.MAX_RUN)
            # rows one by one (a screened S): the plain kernel, without the run loop
            self.runs = runs if len(runs) - 1 <= 0.5 * A.shape[0] else None

    def __matmul__(self, X):
        X = np.asarray(X)
        A = self.A
        if self.runs is None or X.ndim != 2 or X.dtype != A.dtype or A.nnz * X.shape[1] < MIN_WORK:
            return csr_times_block(A, X) if np.isrealobj(X) else A @ X
        out = np.empty((A.shape[0], X.shape[1]), A.dtype)
        _grouped_kernel(self.runs, A.indptr, A.indices, A.data, np.ascontiguousarray(X), out)
        return out


def csr_times_block(A, X: np.ndarray) -> np.ndarray:
    """``A @ X`` for a real sparse matrix A (n, n') and a real block X (n', m) (float32
    for both in float32)."""
    if (
        numba is None
        or X.ndim != 2
        or A.dtype not in _REAL
        or X.dtype != A.dtype
        or A.nnz * X.shape[1] < MIN_WORK
    ):
        return np.asarray(A @ X)
    A = A if sp.isspmatrix_csr(A) or isinstance(A, sp.csr_array) else sp.csr_matrix(A)
    out = np.empty((A.shape[0], X.shape[1]), A.dtype)
    _kernel(A.indptr, A.indices, A.data, np.ascontiguousarray(X), out)
    return out


def times(A, X):
    """A @ X: :func:`csr_times_block` for a real CSR A and a real 2D block X, else scipy."""
    if np.isrealobj(X) and A.dtype == np.float64 and np.ndim(X) == 2:
        return csr_times_block(A, X)
    return A @ X
