"""Triangular solves with a sparse Cholesky factor in single precision.

At device scale the Chebyshev steps of the KPM (:mod:`.kpm`) spend most of their time in
two triangular solves with the Cholesky factor L of S per step.  The factor of the
3999-atom device is dense enough (367 M non-zeros for 45,289 orbitals) that those solves
are dense matrix products: CHOLMOD's supernodal solve of 32 vectors runs at about
50 GFLOP/s on 2 cores, in double precision, the only precision of the CHOLMOD that
scikit-sparse wraps.  The same products in single precision take half the time and read
half the memory (``benchmarks/supernodal_solve.py``).

:class:`SupernodalFactor` takes CHOLMOD's factor as a sparse lower-triangular matrix
(columns sorted, diagonal first), groups consecutive columns with the same row pattern
(supernodes, at most ``width`` columns each) and stores each as a dense panel in the
chosen precision: the inverse of its diagonal triangle (computed in double precision)
and the rows below it, the latter twice, rows by columns for L^-1 and columns by rows
for L^-T, so that both products pass it to BLAS untransposed (OpenBLAS was markedly
slower on the transposed panel in a trial; the second copy costs as much memory again,
1.4 GiB on the device).  A solve then is one small product per supernode with the
diagonal inverse and one with the panel below, plus a gather or scatter of the rows the
panel touches, in numba around the BLAS of numpy/scipy.

Accuracy: each solve has a relative error of about the unit round-off (6e-8) times the
condition number of L; for the device's S, 1.7e-6 (L^-1) and 2.1e-6 (L^-T) against
CHOLMOD's double-precision solve, which these panels run in half the time
(``benchmarks/supernodal_solve.py``; ``benchmarks/kpm_device.py --precision single
double`` prints the difference of the KPM moments).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..core.errors import GearsHError

__all__ = ["SupernodalFactor", "SupernodalError", "available"]

WIDTH = 1024  # columns per supernode at most (larger supernodes are split)

try:
    import numba
except ImportError:  # optional dependency (extra 'gpaw')
    numba = None


class SupernodalError(GearsHError, ValueError):
    """Invalid input to :class:`SupernodalFactor`."""


def available() -> bool:
    """Whether single-precision solves can run here (they need numba)."""
    return numba is not None


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _supernodes(indptr, indices, width):  # pragma: no cover - compiled
        """Column starts of the supernodes, (n_supernodes + 1,): column j + 1 joins
        column j's supernode when its rows are column j's rows after the diagonal."""
        n = len(indptr) - 1
        starts = np.empty(n + 1, np.int64)
        starts[0] = 0
        ns = 0
        w = 1
        for j in range(n - 1):
            c0, c1, c2 = indptr[j], indptr[j + 1], indptr[j + 2]
            same = w < width and c1 - c0 - 1 == c2 - c1 and c1 - c0 > 1
            if same and indices[c0 + 1] != j + 1:
                same = False
            if same:
                for p in range(c2 - c1):
                    if indices[c0 + 1 + p] != indices[c1 + p]:
                        same = False
                        break
            if same:
                w += 1
            else:
                ns += 1
                starts[ns] = j + 1
                w = 1
        ns += 1
        starts[ns] = n
        return starts[: ns + 1].copy()

    @numba.njit(cache=True, nogil=True)
    def _pack(
        indptr, indices, data, starts, below, boff, doff, roff, panels, panels_t, inverses, rows
    ):  # pragma: no cover - compiled
        for s in range(len(starts) - 1):
            a = starts[s]
            k = starts[s + 1] - a
            m = below[s]
            D = np.zeros((k, k))
            for jj in range(k):
                p0 = indptr[a + jj]
                for i in range(jj, k):
                    D[i, jj] = data[p0 + i - jj]
                base = p0 + k - jj
                for i in range(m):
                    panels[boff[s] + i * k + jj] = data[base + i]
                    panels_t[boff[s] + jj * m + i] = data[base + i]
            Di = np.linalg.inv(D)
            for i in range(k):
                for jj in range(k):
                    inverses[doff[s] + i * k + jj] = Di[i, jj]
            p0 = indptr[a] + k
            for i in range(m):
                rows[roff[s] + i] = indices[p0 + i]

    @numba.njit(cache=True, nogil=True)
    def _forward(
        starts, below, boff, doff, roff, panels, inverses, rows, Y
    ):  # pragma: no cover - compiled
        """Y <- L^-1 Y in place."""
        r = Y.shape[1]
        for s in range(len(starts) - 1):
            a, b = starts[s], starts[s + 1]
            k = b - a
            m = below[s]
            ys = np.dot(inverses[doff[s] : doff[s] + k * k].reshape(k, k), Y[a:b])
            Y[a:b] = ys
            if m:
                T = np.dot(panels[boff[s] : boff[s] + m * k].reshape(m, k), ys)
                ro = roff[s]
                for i in range(m):
                    row = rows[ro + i]
                    for c in range(r):
                        Y[row, c] -= T[i, c]

    @numba.njit(cache=True, nogil=True)
    def _backward(
        starts, below, boff, doff, roff, panels, inverses, rows, Y
    ):  # pragma: no cover - compiled
        """Y <- L^-T Y in place (``panels``: the transposed layout, k x m)."""
        r = Y.shape[1]
        for s in range(len(starts) - 2, -1, -1):
            a, b = starts[s], starts[s + 1]
            k = b - a
            m = below[s]
            rhs = Y[a:b].copy()
            if m:
                G = np.empty((m, r), Y.dtype)
                ro = roff[s]
                for i in range(m):
                    row = rows[ro + i]
                    for c in range(r):
                        G[i, c] = Y[row, c]
                rhs -= np.dot(panels[boff[s] : boff[s] + m * k].reshape(k, m), G)
            Y[a:b] = np.dot(inverses[doff[s] : doff[s] + k * k].reshape(k, k).T, rhs)


class SupernodalFactor:
    """A real sparse lower-triangular factor L (scipy CSC or anything convertible, e.g.
    CHOLMOD's ``Factor.L()``) as dense supernodal panels of ``dtype`` (float32 by
    default; float64 gives the same numbers as a double-precision solve to round-off).

    ``forward(Y)`` returns L^-1 Y and ``backward(Y)`` L^-T Y for real or complex Y of
    shape (n,) or (n, k); the work runs in ``dtype`` and the result comes back in double
    precision (float64, or complex128 for complex Y), or with ``keep=True`` in ``dtype``
    (complex64 for complex Y and float32 panels)."""

    def __init__(self, L, dtype=np.float32, width: int = WIDTH):
        if numba is None:
            raise SupernodalError("single-precision solves need numba; it is not installed")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise SupernodalError(f"dtype must be float32 or float64; got {dtype}")
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise SupernodalError(f"width must be an integer >= 1; got {width!r}")
        L = sp.csc_matrix(L)
        n = L.shape[0]
        if L.shape != (n, n) or n == 0:
            raise SupernodalError(f"L must be a non-empty square matrix; got shape {L.shape}")
        if L.dtype.kind not in "fi":
            raise SupernodalError(f"L must be real; got dtype {L.dtype}")
        L.sort_indices()
        counts = np.diff(L.indptr)
        if (counts == 0).any() or (L.indices[L.indptr[:-1]] != np.arange(n)).any():
            raise SupernodalError(
                "L must be lower triangular with every diagonal element stored (a Cholesky factor)"
            )
        diag = L.data[L.indptr[:-1]]
        if not (np.isfinite(L.data).all() and (diag != 0).all()):
            raise SupernodalError("L must be finite with a non-zero diagonal")
        self.n, self.dtype = n, dtype
        indptr = L.indptr.astype(np.int64)
        starts = _supernodes(indptr, L.indices, int(width))
        k = np.diff(starts)
        below = counts[starts[:-1]] - k
        offsets = [
            np.concatenate([[0], np.cumsum(x)]).astype(np.int64) for x in (below * k, k * k, below)
        ]
        self.panels = np.empty(offsets[0][-1], dtype)
        self.panels_t = np.empty(offsets[0][-1], dtype)
        self.inverses = np.empty(offsets[1][-1], dtype)
        self.rows = np.empty(offsets[2][-1], np.int32)
        _pack(
            indptr,
            L.indices,
            L.data.astype(np.float64, copy=False),
            starts,
            below,
            *offsets,
            self.panels,
            self.panels_t,
            self.inverses,
            self.rows,
        )
        self._parts = (starts, below.astype(np.int64), *offsets)
        self.n_supernodes = len(k)

    @property
    def nbytes(self) -> int:
        return self.panels.nbytes + self.panels_t.nbytes + self.inverses.nbytes + self.rows.nbytes

    def _run(self, kernel, panels, Y, keep: bool = False):
        Y = np.asarray(Y)
        if Y.shape[:1] != (self.n,) or Y.ndim not in (1, 2):
            raise SupernodalError(
                f"vectors must have shape ({self.n},) or ({self.n}, k); got {Y.shape}"
            )
        out_dtype = np.result_type(Y.dtype, np.float64)
        work_dtype = np.result_type(self.dtype, np.complex64) if Y.dtype.kind == "c" else self.dtype
        W = np.array(Y.reshape(self.n, -1), dtype=work_dtype, order="C")
        if W.dtype.kind == "c":  # a real L acts on the real and imaginary parts alike
            W = W.view(self.dtype)
        kernel(*self._parts, panels, self.inverses, self.rows, W)
        if Y.dtype.kind == "c":
            W = W.view(work_dtype)
        return (W if keep else W.astype(out_dtype, copy=False)).reshape(Y.shape)

    def forward(self, Y, keep: bool = False) -> np.ndarray:
        """L^-1 Y (``keep=True``: in the factor's precision, not Y's)."""
        return self._run(_forward, self.panels, Y, keep)

    def backward(self, Y, keep: bool = False) -> np.ndarray:
        """L^-T Y (``keep=True``: in the factor's precision, not Y's)."""
        return self._run(_backward, self.panels_t, Y, keep)
