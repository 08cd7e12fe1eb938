"""Exact states near an energy for large sparse H c = E S c (real symmetric, Gamma point).

One sparse symmetric-indefinite factorisation K = H - sigma S = P L D L^T P^T (MKL
PARDISO through pypardiso: nested-dissection ordering, Bunch-Kaufman pivoting inside
supernodes) gives two exact results that KPM only estimates:

* **state counts** (Sylvester's law of inertia): S is positive definite, so the number
  of eigenvalues of (H, S) below sigma equals the number of negative eigenvalues of K,
  which the factorisation reports (:func:`count_below`);
* **eigenpairs nearest sigma**: block shift-invert Krylov iteration on T = K^-1 S,
  whose largest eigenvalues 1 / (E - sigma) belong to the E closest to sigma, with a
  Rayleigh-Ritz step on H and S and thick restarts (:func:`states_near`).

Together they give the Fermi level without smearing errors (the count below sigma
fixes which computed state is the highest occupied one; :func:`fermi_states`), the
states in an energy window (:func:`window_states`) and their Mulliken weights per
orbital group: the paper's hole count (W + Se states from E_F to E_F + 0.2 eV) without
the broadening of a Chebyshev kernel.  Each factorisation costs about as much as the
Cholesky factorisation of S behind KPM; each block of solves is cheap.

Accuracy: the eigenvectors c are S-orthonormal and a state counts as converged when
||H c - E S c||_2 <= ``tol`` (eV, default 1e-4); then some eigenvalue of (H, S) lies
within ||r||_{S^-1} <= tol / sqrt(lambda_min(S)) of E, and the Ritz value itself is
accurate to about ||r||^2 / (distance to the next eigenvalue): 5e-11 eV for the
band-edge states of a 954-atom WSe2 supercell (``benchmarks/window_supercell.py``).
The counts are exact unless PARDISO had to perturb pivots
(``IndefiniteFactor.n_perturbed``; a warning says so).
Complex H(k) (k != 0) is not supported here: use dense diagonalisation of the small
cell, which is what k-sampling is for.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from ..core.errors import GearsHError
from .sparse_products import csr_times_block

__all__ = [
    "WindowError",
    "InertiaWarning",
    "IndefiniteFactor",
    "NearStates",
    "count_below",
    "states_near",
    "window_states",
    "edge_shift",
    "fermi_states",
    "initial_guess",
    "local_guess",
]

SYMMETRIC_RTOL = 1e-8


class WindowError(GearsHError, ValueError):
    """Invalid input to the window eigensolver, or a problem it cannot solve."""


class InertiaWarning(UserWarning):
    """PARDISO perturbed pivots: the state count below sigma may be off."""


def _check_pair(H, S) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    hs, ss = np.shape(H), np.shape(S)
    if len(hs) != 2 or hs[0] != hs[1] or hs != ss or hs[0] == 0:
        raise WindowError(
            f"H and S must be non-empty square matrices of the same shape; got H {hs} and S {ss}"
        )
    out = []
    for name, M in (("H", H), ("S", S)):
        M = sp.csr_matrix(M)
        if M.dtype.kind == "c":
            if M.nnz and abs(M.data.imag).max() > SYMMETRIC_RTOL * abs(M.data).max():
                raise WindowError(
                    f"{name} is complex (k != 0): the window solver handles real symmetric "
                    f"matrices (Gamma point); diagonalise a k-sampled small cell densely"
                )
            M = sp.csr_matrix(M.real)
        M = M.astype(np.float64)
        if M.nnz and not np.isfinite(M.data).all():
            raise WindowError(f"{name} has non-finite entries")
        scale = abs(M).max() if M.nnz else 0.0
        asym = abs(M - M.T).max() if M.nnz else 0.0
        if asym > SYMMETRIC_RTOL * scale:
            raise WindowError(
                f"{name} must be symmetric; got max |{name} - {name}^T| = {asym:.3g} "
                f"for max |{name}| = {scale:.3g}"
            )
        out.append(M)
    return out[0], out[1]


def _check_number(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise WindowError(f"{name} must be a finite number (eV), got {x!r}")
    if not np.isfinite(x):
        raise WindowError(f"{name} must be a finite number (eV), got {x!r}")
    return float(x)


_PARDISO = None


def _pardiso_class():
    """pypardiso's solver with a solve that skips what a fixed factorisation does not
    need: the per-call comparison of the matrix with the factorised one and the int32
    copies of its index arrays (at 43k orbitals about 0.3 s of a 2-3 s block solve)."""
    global _PARDISO
    if _PARDISO is not None:
        return _PARDISO
    try:
        from pypardiso import PyPardisoSolver
    except ImportError as err:  # the optional dependency is missing
        raise WindowError(
            "exact window states need pypardiso and mkl (pip install pypardiso mkl; "
            f"installed by `make install`): {err}"
        ) from None

    class _Solver(PyPardisoSolver):
        _index = None  # (A, 1-based indptr, 1-based indices) of the factorised matrix

        def _call_pardiso(self, A, b):
            # pypardiso's call, with the 1-based int32 index arrays made once per matrix
            import ctypes

            if self._index is None or self._index[0] is not A:
                self._index = (A, A.indptr.astype(np.int32) + 1, A.indices.astype(np.int32) + 1)
            _, ia, ja = self._index
            x = np.zeros_like(b)
            error = ctypes.c_int32(0)
            i32, f64 = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_double)
            self._mkl_pardiso(
                self.pt.ctypes.data_as(ctypes.POINTER(self._pt_type[0])),
                ctypes.byref(ctypes.c_int32(1)),  # maxfct
                ctypes.byref(ctypes.c_int32(1)),  # mnum
                ctypes.byref(ctypes.c_int32(self.mtype)),
                ctypes.byref(ctypes.c_int32(self.phase)),
                ctypes.byref(ctypes.c_int32(A.shape[0])),
                A.data.ctypes.data_as(f64),
                ia.ctypes.data_as(i32),
                ja.ctypes.data_as(i32),
                self.perm.ctypes.data_as(i32),
                ctypes.byref(ctypes.c_int32(1 if b.ndim == 1 else b.shape[1])),  # nrhs
                self.iparm.ctypes.data_as(i32),
                ctypes.byref(ctypes.c_int32(self.msglvl)),
                b.ctypes.data_as(f64),
                x.ctypes.data_as(f64),
                ctypes.byref(error),
            )
            if error.value != 0:
                from pypardiso.pardiso_wrapper import PyPardisoError

                raise PyPardisoError(error.value)
            return np.ascontiguousarray(x)

        def factorize(self, A):
            # pypardiso's, without keeping a copy of A to compare later solves with
            # (solve_factorised does not compare: 0.7 GB at 43k orbitals)
            self._check_A(A)
            self.set_phase(12)
            self._call_pardiso(A, np.zeros((A.shape[0], 1)))

        def solve_factorised(self, A, b):
            """A^-1 b with the factorisation of A made by factorize (phase 33 only)."""
            self.set_phase(33)
            return self._call_pardiso(A, np.asfortranarray(b, dtype=np.float64))

        def free_memory(self, everything=False):
            self._index = None
            super().free_memory(everything=everything)

    _PARDISO = _Solver
    return _Solver


class IndefiniteFactor:
    """P L D L^T P^T of a real symmetric sparse matrix A (MKL PARDISO, matrix type -2).

    ``n_negative``/``n_positive``: the inertia of A (eigenvalue counts by sign);
    ``n_perturbed``: pivots PARDISO perturbed (the inertia is exact when it is 0);
    ``solve(B)``: A^-1 B for a vector or a block of vectors (n, m), with PARDISO's
    iterative refinement.  Blocks of vectors amortise the pass over the factor."""

    def __init__(self, A, threads: int | None = None):
        PyPardisoSolver = _pardiso_class()
        A = sp.csr_matrix(A, dtype=np.float64)
        n = A.shape[0]
        upper = sp.triu(A, format="csr")
        # PARDISO's symmetric types need every diagonal entry stored (zeros allowed)
        upper = (upper + sp.csr_matrix((np.zeros(n), (np.arange(n), np.arange(n))), (n, n))).tocsr()
        upper.sort_indices()
        self.shape = A.shape
        self.sigma = None  # the shift when A = H - sigma S (set by the functions below)
        self._upper = upper
        solver = PyPardisoSolver(mtype=-2)
        solver.set_iparm(1, 1)  # our settings below, PARDISO's defaults elsewhere
        solver.set_iparm(2, 2)  # METIS nested dissection
        # iparm(8) = 0: iterative refinement only after perturbed pivots (each step is
        # another pass over the factor: 3x the solve time at 45k orbitals, and the
        # Krylov iteration needs no more than the factor's ~1e-8 relative accuracy)
        solver.set_iparm(8, 0)
        solver.set_iparm(10, 8)  # pivot perturbation 1e-8 (only when needed)
        solver.set_iparm(21, 1)  # Bunch-Kaufman 1x1 and 2x2 pivots
        self._solver = solver
        t = time.perf_counter()
        try:
            solver.factorize(upper)
        except Exception as err:  # PyPardisoError carries PARDISO's error code
            raise WindowError(f"PARDISO could not factorise H - sigma S: {err}") from None
        self.seconds = time.perf_counter() - t
        self.n_positive = int(solver.iparm[21])
        self.n_negative = int(solver.iparm[22])
        self.n_perturbed = int(solver.iparm[13])
        self.factor_nonzeros = int(solver.iparm[17])

    def solve(self, B) -> np.ndarray:
        B = np.asarray(B, np.float64)
        if B.shape[0] != self.shape[0]:
            raise WindowError(
                f"expected {self.shape[0]} rows in the right-hand side, got {B.shape}"
            )
        if self._solver is None:
            raise WindowError("this factorisation was freed (IndefiniteFactor.free)")
        return self._solver.solve_factorised(self._upper, B)

    @property
    def freed(self) -> bool:
        """True once :meth:`free` has released the factor."""
        return getattr(self, "_solver", None) is None

    def free(self) -> None:
        """Release PARDISO's memory (the factor).  Also done when the object is
        garbage-collected: PARDISO's memory is outside Python's."""
        solver, self._solver = getattr(self, "_solver", None), None
        if solver is not None:
            solver.free_memory(everything=True)

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def _factor(H, S, sigma: float) -> IndefiniteFactor:
    f = IndefiniteFactor((H - sigma * S).tocsr())
    f.sigma = float(sigma)
    if f.n_perturbed:
        warnings.warn(
            f"PARDISO perturbed {f.n_perturbed} pivots of H - {sigma:.6g} S: sigma is (nearly) "
            f"an eigenvalue or S is nearly singular; the count of states below sigma may "
            f"be off by up to that number (move sigma slightly)",
            InertiaWarning,
            stacklevel=3,
        )
    return f


def count_below(H, S, sigma: float, factor: IndefiniteFactor | None = None) -> int:
    """The number of eigenvalues of H c = E S c below ``sigma`` (exact, from the inertia
    of H - sigma S; pass ``factor`` of that matrix to reuse it)."""
    sigma = _check_number("sigma", sigma)
    if factor is None:
        H, S = _check_pair(H, S)
        factor = _factor(H, S, sigma)
    return factor.n_negative


@dataclass
class NearStates:
    """Eigenpairs of (H, S) nearest ``sigma``, sorted by energy.

    ``eigenvalues`` (k,) eV; ``vectors`` (n, k), S-orthonormal; ``residuals`` (k,)
    ||H c - E S c||_2; ``n_below``: exact number of eigenvalues below sigma;
    ``radius``: the largest |E - sigma| computed; every eigenvalue with
    |E - sigma| <= radius is among ``eigenvalues`` (a random start block leaves no
    eigenvector out of the Krylov space in practice; the tests compare with dense);
    ``seconds``: factorisation and iteration times; ``solves``: right-hand sides solved;
    with ``below``/``above`` requests, every eigenvalue in [sigma - reach_below,
    sigma + reach_above] is among ``eigenvalues``.
    """

    sigma: float
    eigenvalues: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    n_below: int
    radius: float
    seconds: dict
    solves: int
    reach_below: float | None = None  # one-sided requests: all states in
    reach_above: float | None = None  # [sigma - reach_below, sigma + reach_above] found
    space: object = None  # the Krylov space, to continue with more states

    def __post_init__(self):
        if self.reach_below is None:
            self.reach_below = self.radius
        if self.reach_above is None:
            self.reach_above = self.radius

    @property
    def n_below_set(self) -> int:
        """Eigenvalues below the computed set (all of them are below sigma - radius)."""
        return self.n_below - int((self.eigenvalues < self.sigma).sum())

    def index_of(self, i: int) -> int:
        """Position in ``eigenvalues`` of the eigenvalue with global index ``i`` (0-based,
        in ascending order over the whole spectrum), or -1 when it was not computed."""
        j = i - self.n_below_set
        return j if 0 <= j < len(self.eigenvalues) else -1

    def weights(self, S, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Mulliken weight of each state on each group of orbitals (they sum to 1
        over a partition): sum_{mu in g} c_mu (S c)_mu."""
        w = self.vectors * csr_times_block(sp.csr_matrix(S, dtype=np.float64), self.vectors)
        return {name: w[np.asarray(idx)].sum(axis=0) for name, idx in groups.items()}


class _BlockKrylov:
    """Block shift-invert Krylov space of T = K^-1 S with S-orthonormal basis Q, kept
    with H Q, S Q and K^-1 S Q (so the projections cost no sparse product).

    States are selected with the projected T, whose largest |theta| = 1 / |E - sigma|
    are the states nearest sigma (a Rayleigh-Ritz step with H alone produces spurious
    values near an interior sigma), then refined by Rayleigh-Ritz with H inside the
    selected subspace."""

    def __init__(self, H, S, factor, block: int, seed, max_basis: int):
        self.H, self.S, self.K = H, S, factor
        n = H.shape[0]
        self.n = n
        self.Q = np.zeros((n, 0))
        self.HQ = np.zeros((n, 0))
        self.SQ = np.zeros((n, 0))
        self.KQ = np.zeros((n, 0))
        self.Hs = np.zeros((0, 0))
        self.Ts = np.zeros((0, 0))
        rng = np.random.default_rng(seed)
        self.X = rng.standard_normal((n, min(block, n)))
        # H X = B + sigma S X for the block X = K^-1 B that a solve returned (K = H -
        # sigma S), so H X costs no sparse product: only S X is computed.  None: H X is
        # computed (the random start, a factor of unknown shift, or after a check
        # found the solves too inexact for the identity: _explicit)
        self.B = None
        self.sigma = getattr(factor, "sigma", None)
        self.implicit = self.sigma is not None
        # the largest error of an implicit H x accepted (eV; states_near sets it from its
        # tolerance): one column of every block is also multiplied by H to check it
        self.identity_tol = 0.0
        self.max_basis = max_basis
        self.solves = 0

    def expand(self) -> bool:
        """Add the current block (S-orthonormalised against Q) and apply T to it;
        False when nothing new was added."""
        W = self.X
        SW = csr_times_block(self.S, W)
        if self.implicit and self.B is not None:
            HW = self.B + self.sigma * SW
        else:
            HW = csr_times_block(self.H, W)
        for _ in range(2):  # S-orthogonal to Q (twice is enough)
            if self.Q.shape[1]:
                coef = self.SQ.T @ W
                W = W - self.Q @ coef
                SW = SW - self.SQ @ coef
                HW = HW - self.HQ @ coef
        G = W.T @ SW
        g, U = np.linalg.eigh(0.5 * (G + G.T))
        keep = g > 1e-12 * max(g.max(initial=0.0), 1e-300)
        if not keep.any():
            return False
        T = U[:, keep] / np.sqrt(g[keep])
        W, SW, HW = W @ T, SW @ T, HW @ T
        if self.implicit and self.B is not None:
            # the identity holds to the solves' accuracy: check it on one column, and
            # with inexact solves (a perturbed or refined-less factor) go explicit
            h0 = csr_times_block(self.H, W[:, :1])[:, 0]  # all cores, like the blocks
            if np.linalg.norm(h0 - HW[:, 0]) > self.identity_tol:
                self._explicit()
                HW = csr_times_block(self.H, W)
        KW = self.K.solve(SW)
        self.solves += SW.shape[1]
        # the projections Q^T H Q and Q^T S K^-1 S Q, grown by the new block's rows and
        # columns (O(n m b) per block instead of O(n m^2))
        self.Hs = _grow(self.Hs, self.Q.T @ HW, W.T @ HW)
        self.Ts = _grow(self.Ts, self.SQ.T @ KW, SW.T @ KW)
        self.Q = np.hstack([self.Q, W])
        self.HQ = np.hstack([self.HQ, HW])
        self.SQ = np.hstack([self.SQ, SW])
        self.KQ = np.hstack([self.KQ, KW])
        self.X, self.B = KW, SW  # K KW = SW: H KW = SW + sigma S KW
        return True

    def accepts(self, Y, E, res, tol: float):
        """(energies, residuals) of the Ritz vectors c = Q Y (converged by the
        residuals ``res`` of the stored H Q) when ||H c - E S c|| <= tol holds with H
        and S applied anew, else None.  With implicit H products H Q carries the
        solves' error (PARDISO without iterative refinement), so the energies returned
        are the Rayleigh quotients c^T H c / c^T S c of the new products; when the
        error spoils a residual, H Q is recomputed, the products are explicit from then
        on, and None tells the caller to select and check again."""
        if not self.implicit or not Y.shape[1]:
            return E, res
        C = self.Q @ Y
        HC, SC = csr_times_block(self.H, C), csr_times_block(self.S, C)
        E = np.einsum("ij,ij->j", C, HC) / np.einsum("ij,ij->j", C, SC)
        res = np.linalg.norm(HC - SC * E, axis=0)
        if (res <= tol).all():
            return E, res
        self._explicit()
        return None

    def _explicit(self):
        """H products explicit from now on; H Q and its projection recomputed."""
        self.implicit = False
        self.HQ = csr_times_block(self.H, self.Q)
        self.Hs = _sym(self.Q.T @ self.HQ)
        self.B = None

    def select(self, k: int, below: int | None = None, above: int | None = None):
        """The k states nearest sigma, or the ``below`` nearest below and the ``above``
        nearest above it (the extreme eigenvalues of T at either end, which converge
        fast even when many states lie nearer on the other side): (E, Y, Zkeep) with Y
        coefficients in Q of the S-orthonormal Ritz vectors Q Y, E their energies and
        Zkeep the T-Ritz vectors to keep at a restart (the selected first)."""
        theta, Z = np.linalg.eigh(self.Ts)  # ascending: most negative = nearest below
        if below is None:
            order = np.argsort(-np.abs(theta), kind="stable")
            sel = order[:k]
        else:
            neg = np.flatnonzero(theta < 0)  # ascending theta: nearest below first
            pos = np.flatnonzero(theta > 0)[::-1]  # nearest above first
            sel = np.concatenate([neg[:below], pos[:above]])
            rest = np.concatenate([neg[below:], pos[above:]])
            order = np.concatenate([sel, rest[np.argsort(-np.abs(theta[rest]), kind="stable")]])
        Zk = Z[:, sel]
        E, V = np.linalg.eigh(_sym(Zk.T @ self.Hs @ Zk))
        return E, Zk @ V, Z[:, order]

    def restart(self, Z):
        """Keep the subspace Q Z; the current block X continues the space once it is
        S-orthogonal to all of Q (then it holds exactly the residual directions of the
        kept T-Ritz vectors, and the Krylov structure survives the restart)."""
        for _ in range(2):
            coef = self.SQ.T @ self.X
            self.X = self.X - self.Q @ coef
            if self.B is not None:  # keep H X = B + sigma S X
                self.B = self.B - self.HQ @ coef + self.sigma * (self.SQ @ coef)
        self.Q, self.HQ, self.SQ, self.KQ = (
            self.Q @ Z,
            self.HQ @ Z,
            self.SQ @ Z,
            self.KQ @ Z,
        )
        self.Hs, self.Ts = _sym(Z.T @ self.Hs @ Z), _sym(Z.T @ self.Ts @ Z)


def _sym(A):
    return 0.5 * (A + A.T)


def _grow(P, cross, corner):
    """[[P, cross], [cross^T, corner]], symmetrised."""
    m, b = cross.shape
    out = np.empty((m + b, m + b))
    out[:m, :m] = P
    out[:m, m:] = cross
    out[m:, :m] = cross.T
    out[m:, m:] = _sym(corner)
    return out


def states_near(
    H,
    S,
    sigma: float,
    k: int,
    *,
    factor: IndefiniteFactor | None = None,
    block: int = 32,
    tol: float = 1e-4,
    max_solves: int | None = None,
    seed=0,
    progress: bool = False,
    below: int | None = None,
    above: int | None = None,
    space=None,
    enough: tuple[float, float] | None = None,
    partial: bool = False,
    _checked: bool = False,
) -> NearStates:
    """The ``k`` eigenpairs of H c = E S c nearest ``sigma`` (eV), exactly (to ``tol``).

    H, S: real symmetric sparse matrices (S positive definite).  ``factor``: the
    :class:`IndefiniteFactor` of H - sigma S, reused when given.  ``block``: vectors
    per solve.  ``tol``: residual norm ||H c - E S c||_2 (eV) below which a state is
    converged (default 1e-4; the Ritz values are then accurate to about tol^2 / level
    spacing).  ``max_solves``: limit on right-hand sides (default 40 k + 20 block).
    ``below``/``above``: instead of the k nearest, the ``below`` nearest states below
    sigma and the ``above`` nearest above it (k is then their sum).  ``space``: the
    ``space`` of an earlier result at the same sigma, continued instead of restarted.
    ``enough=(d_below, d_above)`` (with ``below``/``above``): stop as soon as the states
    converged outwards from sigma reach d_below below it and d_above above it, and
    return those (fewer than asked for; a window needs no more).  ``partial`` (with
    ``below``/``above``): when ``max_solves`` is reached, return the states converged
    outwards from sigma so far, maybe none (``reach_below``/``reach_above`` say how far
    they go), instead of raising; ``space`` continues from there."""
    sigma = _check_number("sigma", sigma)
    if not _checked:  # the callers below check H and S once, not per call
        H, S = _check_pair(H, S)
    n = H.shape[0]
    one_sided = below is not None or above is not None
    if one_sided:
        below, above = int(below or 0), int(above or 0)
        if factor is not None:  # no more than there are on each side
            below, above = min(below, factor.n_negative), min(above, n - factor.n_negative)
        k = max(below + above, 1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise WindowError(
            f"k must be an integer from 1 to the matrix size {n}, got {k!r}"
            + (f" (below={below}, above={above})" if one_sided else "")
        )
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise WindowError(f"block must be a positive integer, got {block!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise WindowError(f"tol must be a number > 0 (eV), got {tol!r}")
    seconds = {}
    t0 = time.perf_counter()
    if factor is None:
        factor = _factor(H, S, sigma)
        seconds["factorisation"] = factor.seconds
    elif factor.shape != H.shape:
        raise WindowError(f"factor is of shape {factor.shape}, H of {H.shape}")
    if n <= max(3 * block, 2 * k + block, 64):  # small: dense
        E, C = scipy.linalg.eigh(H.toarray(), S.toarray())
        if one_sided:
            nb = int((E < sigma).sum())
            order = np.arange(max(0, nb - below), min(n, nb + above))
            lo_e = E[order[0]] if below and len(order) else sigma
            hi_e = E[order[-1]] if above and len(order) else sigma
            Csel = C[:, order]
            res = np.linalg.norm(H @ Csel - (S @ Csel) * E[order], axis=0)
            seconds["iteration"] = time.perf_counter() - t0 - seconds.get("factorisation", 0.0)
            return NearStates(
                sigma,
                E[order],
                Csel,
                res,
                factor.n_negative,
                float(np.abs(E[order] - sigma).max(initial=0.0)),
                seconds,
                0,
                reach_below=float(sigma - lo_e),
                reach_above=float(hi_e - sigma),
            )
        order = np.sort(np.argsort(np.abs(E - sigma), kind="stable")[:k])
        Csel = C[:, order]
        res = np.linalg.norm(H @ Csel - (S @ Csel) * E[order], axis=0)
        radius = float(np.abs(E[order] - sigma).max())
        seconds["iteration"] = time.perf_counter() - t0 - seconds.get("factorisation", 0.0)
        return NearStates(sigma, E[order], Csel, res, factor.n_negative, radius, seconds, 0)
    block = int(min(block, n))
    keep_n = k + block
    max_basis = max(3 * keep_n, keep_n + 8 * block)
    if space is None:
        space = _BlockKrylov(H, S, factor, block, seed, max_basis=max_basis)
    else:
        space.max_basis = max(space.max_basis, max_basis)
    start_solves = space.solves
    space.identity_tol = 1e-2 * tol
    max_solves = max_solves or 40 * k + 20 * block
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=k, desc="states near sigma", unit="state")
    converged = 0
    recheck = False  # select again without expanding (accepts() recomputed H Q)
    try:
        while True:
            grew = True if recheck else space.expand()
            recheck = False
            if space.Q.shape[1] >= k:
                E, Y, Zall = space.select(k, *((below, above) if one_sided else ()))
                R = space.HQ @ Y - (space.SQ @ Y) * E
                res = np.linalg.norm(R, axis=0)
                # converged from the nearest outwards (a far state may not count alone)
                ok = np.cumprod(res[np.argsort(np.abs(E - sigma), kind="stable")] <= tol)
                if one_sided:  # outwards on either side
                    lo = np.flatnonzero(E < sigma)[::-1]  # nearest below first
                    hi = np.flatnonzero(E >= sigma)
                    ok_lo, ok_hi = np.cumprod(res[lo] <= tol), np.cumprod(res[hi] <= tol)
                    ok = np.concatenate([ok_lo, ok_hi])
                if bar is not None:
                    bar.update(int(ok.sum()) - converged)
                converged = int(ok.sum())
                if converged == k:
                    checked = space.accepts(Y, E, res, tol)
                    if checked is None:
                        recheck = True
                        continue
                    E, res = checked
                    break
                if one_sided and enough is not None:
                    n_lo, n_hi = int(ok_lo.sum()), int(ok_hi.sum())
                    lo_done = not below or (n_lo and sigma - E[lo[n_lo - 1]] >= enough[0])
                    hi_done = not above or (n_hi and E[hi[n_hi - 1]] - sigma >= enough[1])
                    if lo_done and hi_done:  # the converged states cover the request
                        keep = np.sort(np.concatenate([lo[:n_lo], hi[:n_hi]]))
                        checked = space.accepts(Y[:, keep], E[keep], res[keep], tol)
                        if checked is None:
                            recheck = True
                            continue
                        (E, res), Y = checked, Y[:, keep]
                        break
            if not grew or space.solves - start_solves >= max_solves:
                if partial and one_sided and grew:
                    # what converged so far (maybe nothing), for the caller to go on
                    if space.Q.shape[1] < k:  # the basis is smaller than the request
                        E, Y, _ = space.select(k, below, above)
                        res = np.linalg.norm(space.HQ @ Y - (space.SQ @ Y) * E, axis=0)
                        lo, hi = np.flatnonzero(E < sigma)[::-1], np.flatnonzero(E >= sigma)
                        ok_lo, ok_hi = np.cumprod(res[lo] <= tol), np.cumprod(res[hi] <= tol)
                    n_lo, n_hi = int(ok_lo.sum()), int(ok_hi.sum())
                    keep = np.sort(np.concatenate([lo[:n_lo], hi[:n_hi]]))
                    checked = space.accepts(Y[:, keep], E[keep], res[keep], tol)
                    if checked is None:
                        recheck = True
                        continue
                    (E, res), Y = checked, Y[:, keep]
                    below, above = n_lo if below else 0, n_hi if above else 0
                    break
                err = WindowError(
                    f"the {k} states nearest {sigma:.4f} eV did not converge to "
                    f"{tol:g} eV in {space.solves - start_solves} solves ({converged} "
                    f"converged); "
                    f"raise max_solves or tol"
                )
                # the unconverged Ritz values, for callers that only need estimates
                err.estimates = E if space.Q.shape[1] >= k else None
                raise err
            if space.Q.shape[1] + block > space.max_basis:
                space.restart(Zall[:, :keep_n])
    finally:
        if bar is not None:
            bar.close()
    C = space.Q @ Y
    radius = float(np.abs(E - sigma).max(initial=0.0))
    reach = {}
    if one_sided:
        reach = dict(
            reach_below=float(sigma - E.min()) if below else 0.0,
            reach_above=float(E.max() - sigma) if above else 0.0,
        )
    seconds["iteration"] = time.perf_counter() - t0 - seconds.get("factorisation", 0.0)
    return NearStates(
        sigma,
        E,
        C,
        res,
        factor.n_negative,
        radius,
        seconds,
        space.solves - start_solves,
        space=space,
        **reach,
    )


def _check_k(name: str, k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise WindowError(f"{name} must be a positive integer, got {k!r}")
    return int(min(k, n))


# window_states reuses a given factorisation when both window edges lie within this
# many eV of its shift.  From a shift in a nearby gap the window's states are the
# extreme ones of the shift-invert operator and converge well; a shift at the centre of
# a window in a dense band converged worse (benchmarks/window_supercell.py --route both:
# 954-atom WSe2, 27 states, 52.5 s reusing the mid-gap shift 0.44-0.64 eV away, no
# convergence in 4480 solves and 116 s from the window's centre)
REUSE_REACH = 1.0


def window_states(
    H,
    S,
    emin: float,
    emax: float,
    *,
    factor: IndefiniteFactor | None = None,
    k: int = 32,
    refactor: bool | None = None,
    sigma: float | None = None,
    gap: tuple[float, float] | None = None,
    release: bool = False,
    **options,
) -> NearStates:
    """Every eigenpair of H c = E S c with emin <= E <= emax (eV), exactly.

    Factorises H - sigma S, or uses ``factor`` (an :class:`IndefiniteFactor` of
    H - sigma S from :func:`fermi_states` or an earlier call), and asks
    :func:`states_near` for up to ``k`` states on each side, then for more until they
    reach beyond both edges of the window (it stops as soon as the converged states
    cover the window).

    The shift of a new factorisation: ``sigma`` when given; else, with ``gap=(homo,
    lumo)`` (e.g. from :func:`fermi_states`) and a window that ends in the gap, just
    beyond the band edge inside it (:func:`edge_shift`: the window's states are then
    the extreme eigenvalues of the shift-invert operator, spread far apart, and
    converge fast); else the window's centre.  ``refactor``: None (default) reuses
    ``factor`` when no ``sigma`` is asked for, no edge shift applies and both edges lie
    within ``REUSE_REACH`` (1 eV) of its sigma; True always factorises, False always
    reuses.  ``release``: when a new factorisation is made, free the given ``factor``
    first (the peak memory of one factorisation instead of two; later windows then
    factorise anew).  ``options`` go to :func:`states_near`.  Returns a :class:`NearStates`
    holding only the states in the window (``n_below``: the count below the sigma
    used; ``radius``: the reach needed from sigma; ``seconds['factorisation']`` only
    when a new factorisation was made)."""
    emin, emax = _check_number("emin", emin), _check_number("emax", emax)
    if not emax > emin:
        raise WindowError(f"the window must have emax > emin, got [{emin}, {emax}] eV")
    if refactor is not None and not isinstance(refactor, bool):
        raise WindowError(f"refactor must be None, True or False, got {refactor!r}")
    if sigma is not None:
        sigma = _check_number("sigma", sigma)
        if refactor is False:
            raise WindowError("sigma is the shift of a new factorisation; refactor=False")
    elif gap is not None:
        sigma = edge_shift(emin, emax, *gap)
    H, S = _check_pair(H, S)
    n = H.shape[0]
    k = _check_k("k", k, n)
    seconds = {}
    if factor is not None and (factor.sigma is None or factor.shape != H.shape):
        raise WindowError(
            "factor must be the IndefiniteFactor of H - sigma S from this module "
            "(fermi_states, or an earlier window) for these matrices"
        )
    if factor is not None and factor.freed:  # released by an earlier window: none
        if refactor is False:
            raise WindowError("refactor=False, but the given factor was freed")
        factor = None
    if factor is not None and refactor is None:
        if sigma is not None:
            refactor = sigma != factor.sigma
        else:
            refactor = max(factor.sigma - emin, emax - factor.sigma) > REUSE_REACH
    own = factor is None or refactor
    if own:
        if release and factor is not None:
            factor.free()
        factor = _factor(H, S, 0.5 * (emin + emax) if sigma is None else sigma)
        seconds["factorisation"] = factor.seconds
    try:
        return _window_from(H, S, emin, emax, factor, k, seconds, options)
    finally:
        if own:  # PARDISO's memory, not Python's: release it now
            factor.free()


MAX_STALLED = 3  # window_states: requests in a row whose states reach no further
EDGE_FRACTION = 0.25  # edge_shift: sigma lies this fraction of the window beyond the edge
EDGE_MIN_GAP = 0.01  # eV: narrower "gaps" (level spacings of a metal) get no edge shift


def edge_shift(emin: float, emax: float, homo: float, lumo: float) -> float | None:
    """The shift for the window [emin, emax] (eV) at a band edge, or None.

    When the window ends in the gap (homo, lumo) above the valence band (emin < homo
    <= emax < lumo): homo + d, d = ``EDGE_FRACTION`` x the window's width, at most half
    the gap; mirrored for a window that starts in the gap below the conduction band.
    Shift-invert maps the window's states to 1 / (E - sigma): from such a shift they are
    the largest values, spread over [1 / (w + d), 1 / d], far from the rest of the
    spectrum; from a shift in the middle of the gap they crowd together near 1 / (gap /
    2) and converge slowly (benchmarks/window_supercell.py).  None when the window does
    not touch exactly one band edge or the gap is narrower than ``EDGE_MIN_GAP``
    (0.01 eV: the level spacing of a metal, where the Fermi level's own shift serves)."""
    emin, emax = _check_number("emin", emin), _check_number("emax", emax)
    homo, lumo = _check_number("homo", homo), _check_number("lumo", lumo)
    if not lumo - homo >= EDGE_MIN_GAP:
        return None
    d = min(EDGE_FRACTION * (emax - emin), 0.5 * (lumo - homo))
    if emin < homo <= emax < lumo:
        return homo + d
    if homo < emin <= lumo < emax:
        return lumo - d
    return None


def _window_from(H, S, emin, emax, factor, k, seconds, options) -> NearStates:
    n = H.shape[0]
    sigma = factor.sigma
    # every state between sigma and the far edge on each side of sigma is needed: the
    # nearest ones below and above it (extremes of the shift-invert operator at each end)
    want_below, want_above = max(sigma - emin, 0.0), max(emax - sigma, 0.0)
    below = k if want_below > 0 else 0
    above = k if want_above > 0 else 0
    solves, space, reached, stalled = 0, None, (-1.0, -1.0), 0
    while True:
        # partial: a request that runs out of solves returns what converged, and the
        # next one continues the same space with more states (a larger basis)
        st = states_near(
            H,
            S,
            sigma,
            0,
            factor=factor,
            below=below,
            above=above,
            space=space,
            enough=(want_below, want_above),
            partial=True,
            _checked=True,
            **options,
        )
        space = st.space
        solves += st.solves
        seconds["iteration"] = seconds.get("iteration", 0.0) + st.seconds["iteration"]
        short_below = below and st.reach_below < want_below and below < st.n_below
        short_above = above and st.reach_above < want_above and above < n - st.n_below
        if not (short_below or short_above) or below + above >= n:
            break
        now = (st.reach_below, st.reach_above)
        stalled = stalled + 1 if now[0] <= reached[0] and now[1] <= reached[1] else 0
        if stalled >= MAX_STALLED:
            raise WindowError(
                f"the states of [{emin:.4f}, {emax:.4f}] eV did not converge: after "
                f"{solves} solves from sigma = {sigma:.4f} eV they reach "
                f"{sigma - now[0]:.4f} to {sigma + now[1]:.4f} eV, no further in the "
                f"last {MAX_STALLED} requests; raise max_solves or tol"
            )
        reached = max(now[0], reached[0]), max(now[1], reached[1])
        # more states on the short side: in proportion to the reach still missing
        # (2x to 4x); 2x after a request that ran out of solves (fewer states came back
        # than were asked for: slow convergence, not too small a request)
        got_below = int((st.eigenvalues < sigma).sum())
        if short_below:
            grow = 1.2 * want_below / max(st.reach_below, 1e-9)
            grow = 2.0 if got_below < below else min(4.0, max(2.0, grow))
            below = int(min(n, below * grow))
        if short_above:
            grow = 1.2 * want_above / max(st.reach_above, 1e-9)
            grow = 2.0 if len(st.eigenvalues) - got_below < above else min(4.0, max(2.0, grow))
            above = int(min(n, above * grow))
    st.space = None
    reach = max(want_below, want_above)
    inside = (st.eigenvalues >= emin) & (st.eigenvalues <= emax)
    return NearStates(
        sigma,
        st.eigenvalues[inside],
        st.vectors[:, inside],
        st.residuals[inside],
        st.n_below,
        reach,
        seconds,
        solves,
    )


def initial_guess(H, S, n_electrons: float) -> float:
    """A rough Fermi level without any solve: the level that ``n_electrons`` fill when
    each orbital keeps its diagonal energy H_ii / S_ii (two electrons per orbital)."""
    d = np.asarray(H.diagonal(), float) / np.asarray(S.diagonal(), float)
    d = np.sort(d)
    i = int(np.clip(np.ceil(n_electrons / 2.0) - 1, 0, len(d) - 1))
    above = d[d > d[i] + 1e-6]
    # between two distinct levels: a shift on a (degenerate) diagonal value would
    # make H - sigma S nearly singular
    return float(0.5 * (d[i] + above[0])) if len(above) else float(d[i] + 0.1)


def local_guess(
    H,
    S,
    n_electrons: float,
    atom_of,
    *,
    sample: int = 256,
    shell: float = 0.05,
    width: float = 0.2,
    seed=0,
) -> float:
    """A Fermi level estimate from small dense problems (no factorisation of the whole).

    For a sample of atoms (stratified by ``atom_of`` label counts), the atom and its
    neighbours (atoms sharing an S entry larger than ``shell`` in magnitude) form a
    cluster whose H and S are diagonalised densely; the Mulliken weights of its states
    on the central atom are that atom's local DOS.  Scaled to all atoms and broadened
    by ``width`` eV, their integral holds ``n_electrons`` (two per state) at the
    estimate.  ``atom_of``: the atom of every orbital (orbitals of an atom contiguous).
    Cluster edges leave dangling states, so this is only a first shift (a 954-atom WSe2
    supercell: 0.29 eV below the valence-band maximum, 0.73 eV below mid-gap); the
    exact level comes from :func:`fermi_states`."""
    H, S = _check_pair(H, S)
    atom_of = np.asarray(atom_of, np.int64)
    n = H.shape[0]
    if atom_of.shape != (n,) or np.any(np.diff(atom_of) < 0):
        raise WindowError(
            f"atom_of must give the atom of each of the {n} orbitals, in order; got "
            f"shape {atom_of.shape}"
        )
    n_atoms = int(atom_of.max()) + 1
    start = np.searchsorted(atom_of, np.arange(n_atoms + 1))
    A = sp.csr_matrix((np.ones(n), (atom_of, np.arange(n))), shape=(n_atoms, n))
    big = S.copy()
    big.data = (np.abs(big.data) > shell).astype(np.float64)
    big.eliminate_zeros()
    G = (A @ big @ A.T).tocsr()
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(n_atoms)[: min(sample, n_atoms)])
    energies, weights = [], []
    for i in chosen:
        atoms = G.indices[G.indptr[i] : G.indptr[i + 1]]
        orbs = np.concatenate([np.arange(start[a], start[a + 1]) for a in atoms])
        Hc = H[orbs][:, orbs].toarray()
        Sc = S[orbs][:, orbs].toarray()
        try:
            E, C = scipy.linalg.eigh(Hc, Sc)
        except np.linalg.LinAlgError:
            continue
        own = (orbs >= start[i]) & (orbs < start[i + 1])
        energies.append(E)
        weights.append((C[own] * (Sc @ C)[own]).sum(axis=0))
    if not energies:
        raise WindowError("no local cluster could be diagonalised for a Fermi level guess")
    E = np.concatenate(energies)
    w = np.concatenate(weights) * (n_atoms / len(energies))  # each sample stands for many
    lo, hi = E.min() - 10 * width, E.max() + 10 * width
    for _ in range(100):  # 2 sum w f((E - mu) / width) = n_electrons
        mu = 0.5 * (lo + hi)
        x = np.clip((E - mu) / width, -200, 200)
        if 2.0 * float((w / (1.0 + np.exp(x))).sum()) < n_electrons:
            lo = mu
        else:
            hi = mu
    return float(0.5 * (lo + hi))


def _gap_estimate(err, sigma, need_below, need_above):
    """(HOMO, LUMO) estimates from the Ritz values of a states_near that did not
    converge (``err.estimates``), or None: the HOMO is the need_below-th state below
    sigma or the (need_above - 1)-th above, the LUMO the next one up."""
    E = getattr(err, "estimates", None)
    if E is None:
        return None
    E = np.sort(E)
    below, above = E[E < sigma][::-1], E[E >= sigma]
    seq = np.concatenate([below[:need_below][::-1], above[:need_above]])
    if len(seq) < need_below + need_above:
        return None
    # seq: the need_below states below sigma (ascending), then the need_above above; the
    # HOMO is the second to last when it lies above sigma (need_above > 1), else the first
    i = need_below + need_above - 2 if need_above > 1 else 0
    return float(seq[i]), float(seq[i + 1])


@dataclass
class FermiStates:
    """The Fermi level from exact states near it.

    ``fermi_level`` (eV, the convention of :func:`~ase_gearsh.electronic.dense.fermi_level`
    with the same ``width``: mid-gap for insulators); ``homo``/``lumo``: the highest
    occupied and lowest unoccupied states (per spin, two electrons per state);
    ``states``: the computed states around it (:class:`NearStates`);
    ``factorisations``: the sigmas tried, with their counts below; ``factor``: the last
    factorisation (reuse it for windows near E_F: :func:`window_states`; it holds about
    as much memory as a Cholesky factor of S, ``factor.free()`` releases it)."""

    fermi_level: float
    homo: float
    lumo: float
    states: NearStates
    factorisations: list
    factor: IndefiniteFactor | None = None


def _level_from(st: NearStates, n_electrons: float, width: float):
    """(E_F, homo, lumo) from the states of ``st`` or None when they do not suffice."""
    from .dense import fermi_level

    n_set = len(st.eigenvalues)
    n_sub = n_electrons - 2.0 * st.n_below_set
    i_homo = int(np.ceil(n_electrons / 2.0 - 1e-9)) - 1  # global index of the highest occupied
    jh, jl = st.index_of(i_homo), st.index_of(i_homo + 1)
    if jh < 0 or jl < 0 or not 0 < n_sub < 2 * n_set:
        return None
    mu = fermi_level(st.eigenvalues[None, :], np.ones(1), n_sub, width)
    lo, hi = st.sigma - st.reach_below, st.sigma + st.reach_above
    if width > 0 and not (lo + 12 * width < mu < hi - 12 * width):
        return None
    return mu, float(st.eigenvalues[jh]), float(st.eigenvalues[jl])


def fermi_states(
    H,
    S,
    n_electrons: float,
    *,
    width: float = 0.0,
    guess: float | None = None,
    atom_of=None,
    k: int = 48,
    max_k: int = 512,
    max_factorisations: int = 6,
    **options,
) -> FermiStates:
    """Fermi level, HOMO and LUMO of H c = E S c with ``n_electrons`` (spin-paired),
    from the exact count below a shift and the states nearest it.

    ``guess``: a first shift (eV); default :func:`local_guess` when ``atom_of`` (the atom
    of every orbital) is given, else :func:`initial_guess`.  Each further shift
    moves by the missing number of states over the local density of states measured
    from the computed ones (a secant step once two counts bracket the level), and
    costs one factorisation; near the level, more states are computed instead (up to
    ``max_k``).  ``width``: Fermi-Dirac smearing (eV) of the level, as for dense
    spectra (the states must reach 12 widths beyond it).  ``options`` go to
    :func:`states_near`."""
    H, S = _check_pair(H, S)
    n = H.shape[0]
    n_electrons = _check_number("n_electrons", n_electrons)
    if not 0 < n_electrons < 2 * n:
        raise WindowError(
            f"n_electrons must lie between 0 and 2 x {n} orbitals (exclusive), got {n_electrons}"
        )
    width = _check_number("width", width)
    if width < 0:
        raise WindowError(f"width must be >= 0 eV, got {width}")
    k = _check_k("k", k, n)
    if guess is not None:
        sigma = _check_number("guess", guess)
    elif atom_of is not None:
        sigma = local_guess(H, S, n_electrons, atom_of)
    else:
        sigma = initial_guess(H, S, n_electrons)
    target = n_electrons / 2.0
    tried = []
    lo = hi = None  # (sigma, count) bracketing the level
    for _ in range(max_factorisations):
        factor = _factor(H, S, sigma)
        count = factor.n_negative
        tried.append((sigma, count))
        if count <= target - 0.5 and (lo is None or sigma > lo[0]):
            lo = (sigma, count)
        if count >= target + 0.5 and (hi is None or sigma < hi[0]):
            hi = (sigma, count)
        # the states needed on either side of sigma: the HOMO and LUMO (global indices
        # h, h + 1; count states lie below sigma) and a margin (smearing), each side
        # found as the extreme eigenvalues of the shift-invert operator at that end
        h = int(np.ceil(target - 1e-9)) - 1
        need_below = max(count - h, 1)  # the HOMO is the (count - h)-th below sigma
        need_above = max(h + 2 - count, 1)  # the LUMO is the (h + 2 - count)-th above
        margin, space, st = 0, None, None
        near = need_below + need_above <= k  # else move sigma first
        moved = False
        while near and need_below + need_above + 2 * margin <= max_k:
            try:
                st = states_near(
                    H,
                    S,
                    sigma,
                    0,
                    factor=factor,
                    below=need_below + margin,
                    above=need_above + margin,
                    space=space,
                    _checked=True,
                    **dict(options, max_solves=options.get("max_solves") or 40 * k),
                )
            except WindowError as err:
                # a gap lies between sigma and the HOMO or LUMO: across it, states
                # converge slowly (the nearer ones dominate the shift-invert operator).
                # The unconverged Ritz values still place the gap: the next shift goes
                # to its middle, where HOMO and LUMO are the nearest states on each side
                gap = _gap_estimate(err, sigma, need_below, need_above)
                if gap is None or abs(sum(gap) / 2 - sigma) < 1e-3:
                    raise
                sigma_next = sum(gap) / 2
                moved = True
                break
            space = st.space
            found = _level_from(st, n_electrons, width)
            if found is not None:
                mu, homo, lumo = found
                st.space = None
                return FermiStates(mu, homo, lumo, st, tried, factor)
            margin = max(2 * margin, 2)  # the smearing needs more states around the level
        if moved:
            factor.free()
            sigma = sigma_next
            continue
        if st is None:  # too far: a first look at the density of states here
            st = states_near(H, S, sigma, k, factor=factor, _checked=True, **options)
        span = max(st.reach_below + st.reach_above, 1e-6)
        density = max(len(st.eigenvalues) - 1, 1) / span  # states per eV near sigma
        factor.free()
        step = (target - count) / density
        new = sigma + float(np.clip(step, -20.0, 20.0))
        if lo is not None and hi is not None:  # secant inside the bracket
            s0, c0 = lo
            s1, c1 = hi
            new = s0 + (target - c0) * (s1 - s0) / (c1 - c0)
            new = float(np.clip(new, s0 + 0.05 * (s1 - s0), s1 - 0.05 * (s1 - s0)))
        if any(abs(new - s) < 1e-6 for s, _ in tried):  # no progress: step aside
            new += 0.05 * (1 if target > count else -1)
        sigma = new
    raise WindowError(
        f"the Fermi level was not reached in {max_factorisations} factorisations "
        f"(shift, states below: {', '.join(f'{s:.3f} eV {c}' for s, c in tried)}; "
        f"{target:g} states are occupied); pass a better guess or a larger k"
    )
