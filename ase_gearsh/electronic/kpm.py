"""Kernel polynomial method (KPM) for the DOS and projected DOS of H c = E S c.

H is a sparse real-symmetric or complex-Hermitian Hamiltonian (eV) and S a
sparse symmetric/Hermitian positive-definite overlap of the same shape.  With
A = S^-1 H (similar to L^-1 H L^-T, same real eigenvalues E_k) and S-orthonormal
eigenvectors C, f(A) = C f(E) C^H S, so the Mulliken projected DOS on orbital mu
is [delta(E - A)]_{mu mu} and the total DOS Tr delta(E - A) integrates to the
number of orbitals n (per spin channel).

A is mapped onto (-1, 1) by A~ = (A - b) / a and the Chebyshev moments
mu_m^(g) = Re Tr[P_g T_m(A~)] (P_g: 0/1 projector on a group of orbitals) are
estimated with real Rademacher vectors (or, with ``exact=True``, all unit
vectors).  S = L L^H is factorised once (supernodal sparse Cholesky, CHOLMOD
through scikit-sparse, with a fill-reducing ordering), and the Chebyshev
recursion runs on the Hermitian B = L^-1 H L^-H, similar to A: every step costs
one sparse product with H and one pair of triangular solves per vector.  The
total moments are r^H T_m(B~) r (the lowest-variance form for a Hermitian
matrix); the group moments are (L r)^H P_g L^-H T_m(B~) r, unbiased estimates
of the Mulliken traces Tr[P_g T_m(A~)] that sum over a partition to the total.
Without doubling each step gives one moment. Two moments per step come from
T_a+b = 2 T_a T_b - T_|a-b| with T_n(B~) Hermitian: the total, mu_2n = 2 v_n^H v_n - mu_0
and mu_2n+1 = 2 v_n^H v_n+1 - mu_1 (v_n = T_n(B~) r, the same numbers as r^H T_2n r); a
group g, with the extra start vector w_g = L^-1 P_g L r (so that (L r)^H P_g L^-H =
w_g^H), mu_2n = 2 (T_n w_g)^H v_n - mu_0 and mu_2n+1 = 2 (T_n+1 w_g)^H v_n - mu_1
(mu_0, mu_1 of that group): the same numbers as the one-moment-per-step estimator, at
the cost of propagating one more block of vectors per group. The triangular solves of
a large factor are memory-bound, so more vectors per step cost less than in proportion:
on the 3999-atom device (``benchmarks/kpm_device.py``, 16 random vectors, 2 cores) one
W+Se group took 760 ms per moment two per step against 1013 ms one per step, but the
five species 1933 against 1021 ms.  So by default the total and one group double, and
several groups do not.  (The Hermitian part of the Mulliken weight between T_n and T_n,
without the extra vectors, is a different estimator: measured on WSe2 supercells, it
put the stochastic error of a species' window count at 33 % against 10 %.)  The DOS
is reconstructed with the Jackson kernel (Weisse et al., Rev. Mod. Phys. 78, 275
(2006)), whose energy resolution is about pi * a / M for M moments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.special
from sksparse import cholmod

from ..core.errors import GearsHError
from . import supernodal
from .deflation import DeepStates
from .sparse_products import BlockProduct
from .sparse_products import times as _times

__all__ = [
    "CholeskyFactor",
    "KPMError",
    "KPMMoments",
    "spectral_bounds",
    "chebyshev_moments",
    "jackson_kernel",
    "kpm_density",
    "kpm_dos",
    "kpm_n_moments",
    "kpm_resolution",
    "KPMResolutionWarning",
    "kpm_fermi_level",
    "kpm_fermi_window_count",
    "kpm_window_count",
    "moments_from_eigen",
]

EDGE = 0.01  # the bounds map to x = -+(1 - EDGE), away from the 1/sqrt(1 - x^2) edges
HERMITIAN_RTOL = 1e-8
DENSE_MAX = 200
BOUNDS_RTOL = 3e-3  # ARPACK's tolerance for the extreme eigenvalues (relative)
BOUNDS_MAX_STEPS = 400  # Lanczos steps at most for the bounds
BOUNDS_MARGIN = 0.01  # default widening of the bounds on each side, fraction of the width
PER_VECTOR_MAX = 2**24  # elements (128 MiB) of per-vector moments kept for error bars
DOUBLING_MAX = 2**27  # vector elements (1 GiB) of one doubled block, start vectors included
PRECISIONS = ("double", "single", "auto")
SINGLE_MIN = 20_000  # orbitals from which precision='auto' solves in single precision


class KPMError(GearsHError, ValueError):
    """Invalid input to the KPM routines."""


def _as_matrix(M, name: str):
    M = sp.csr_array(M)
    if M.dtype.kind not in "fc":
        M = M.astype(np.float64)
    scale = abs(M).max() if M.nnz else 0.0
    asym = abs(M - M.conj().T).max() if M.nnz else 0.0
    if asym > HERMITIAN_RTOL * scale:
        raise KPMError(
            f"{name} must be symmetric/Hermitian; got max |{name} - {name}^H| = "
            f"{asym:.3g} for max |{name}| = {scale:.3g}"
        )
    return M


class CholeskyFactor:
    """S = L_f L_f^H with L_f = P^T L, the supernodal CHOLMOD factor of S with a
    fill-reducing (METIS/AMD) ordering P.  ``lt_solve(v)`` = L_f^-H v and
    ``l_solve(y)`` = L_f^-1 y, so B = L_f^-1 H L_f^-H is the Hermitian matrix
    similar to S^-1 H (B = L_f^H S^-1 H L_f^-H) that the Chebyshev steps apply.

    precision: ``'double'`` (CHOLMOD's solves), ``'single'`` (the factor's dense
    supernodal panels in float32, :mod:`.supernodal`: twice as fast at device scale,
    relative error of a solve about 6e-8 times the condition number of L; a real S and
    numba needed; CHOLMOD's factor is released once copied), or ``'auto'``: single for a
    real S of at least :data:`SINGLE_MIN` orbitals when numba is there, else double.
    The vectors stay in double precision: each solve rounds its input to single and
    its output back.

    Factorise once and pass it as ``factor=`` to :func:`spectral_bounds` and
    :func:`chebyshev_moments` (at device scale the factorisation is the costly part)."""

    def __init__(self, S, _checked: bool = False, precision: str = "double"):
        if precision not in PRECISIONS:
            raise KPMError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        if not _checked:
            if len(np.shape(S)) != 2 or np.shape(S)[0] != np.shape(S)[1] or not np.shape(S)[0]:
                raise KPMError(f"S must be a non-empty square 2D matrix; got {np.shape(S)}")
            S = _as_matrix(S, "S")
        self.shape = S.shape
        self.dtype = S.dtype
        if precision == "auto":
            single = S.dtype.kind == "f" and S.shape[0] >= SINGLE_MIN and supernodal.available()
            precision = "single" if single else "double"
        if precision == "single" and S.dtype.kind == "c":
            raise KPMError("precision='single' needs a real S (Gamma point); got a complex S")
        if precision == "single" and not supernodal.available():
            raise KPMError("precision='single' needs numba, which is not installed")
        self.precision = precision
        try:
            self.factor = cholmod.cholesky(sp.csc_matrix(S), mode="supernodal")
        except cholmod.CholmodNotPositiveDefiniteError as err:
            raise KPMError(
                f"S must be positive definite; its Cholesky factorisation failed ({err})"
            ) from None
        self.single = None
        if precision == "single":
            L, self.perm = self.factor.L(), self.factor.P()
            self.factor = None  # CHOLMOD's copy goes before the panels are made
            self.single = supernodal.SupernodalFactor(L, np.float32)
            self.iperm = np.empty_like(self.perm)
            self.iperm[self.perm] = np.arange(len(self.perm))

    def _split(self, fn, y):
        if np.iscomplexobj(y) and self.dtype.kind != "c":  # real factor, complex vectors
            return fn(np.ascontiguousarray(y.real)) + 1j * fn(np.ascontiguousarray(y.imag))
        return fn(np.asarray(y, dtype=np.result_type(y, self.dtype)))

    def lt_solve(self, v, single: bool = False):
        """L_f^-H v; ``single=True`` with a single-precision factor: the result in
        float32/complex64, as the solve made it (for a product in float32)."""
        if self.single is not None:  # P^T L^-T v
            return self.single.backward(v, keep=single)[self.iperm]
        f = self.factor
        return self._split(lambda x: f.apply_Pt(f.solve_Lt(x, use_LDLt_decomposition=False)), v)

    def l_solve(self, y):
        if self.single is not None:  # L^-1 P y
            return self.single.forward(np.asarray(y)[self.perm])
        f = self.factor
        return self._split(lambda x: f.solve_L(f.apply_P(x), use_LDLt_decomposition=False), y)


def _prepare(H, S, factor: CholeskyFactor | None = None):
    """Validate H and S; return (H csr, S csr, Cholesky factor of S: ``factor`` when
    given, else a new one)."""
    hs, ss = np.shape(H), np.shape(S)
    shapes = f"got H {hs} and S {ss}"
    if len(hs) != 2 or len(ss) != 2 or hs[0] != hs[1] or ss[0] != ss[1]:
        raise KPMError(f"H and S must be square 2D matrices; {shapes}")
    if hs != ss or hs[0] == 0:
        raise KPMError(f"H and S must be non-empty and of the same shape; {shapes}")
    H, S = _as_matrix(H, "H"), _as_matrix(S, "S")
    if factor is None:
        return H, S, CholeskyFactor(S, _checked=True)
    if not isinstance(factor, CholeskyFactor) or factor.shape != S.shape:
        raise KPMError(
            f"factor must be the CholeskyFactor of this S {S.shape}; got "
            f"{getattr(factor, 'shape', type(factor).__name__)}"
        )
    return H, S, factor


class _Park:
    """w -> Z X Z^H w: the term that moves the deep states to one energy
    (:meth:`~.deflation.DeepStates.parked`)."""

    X_DROP = 1e-8  # elements of X below this times its largest are left out ...
    X_SPARSE = 0.3  # ... and X is kept sparse when at most this fraction remains

    def __init__(self, deep: DeepStates, energy: float):
        Z, X = deep.parked(energy)
        self.Z, self.ZH = sp.csr_array(Z), sp.csr_array(Z.conj().T)
        # X couples deep states far apart only weakly: sparse at device scale (a change
        # of X within the deep states moves the parked ones, not the others)
        keep = np.abs(X) >= self.X_DROP * np.abs(X).max() if X.size else None
        if X.size and keep.mean() <= self.X_SPARSE:
            X = sp.csr_array(np.where(keep, X, 0.0))
        self.X = X
        self.energy = float(energy)

    def __call__(self, w):
        u = _times(self.ZH, w)
        return _times(self.Z, _times(self.X, u) if sp.issparse(self.X) else self.X @ u)

    def dense(self):
        Z = self.Z.toarray()
        X = self.X.toarray() if sp.issparse(self.X) else self.X
        return Z @ X @ Z.conj().T


def _check_deep(deep, n: int):
    if deep is None:
        return None
    if not isinstance(deep, DeepStates) or deep.basis.shape[0] != n:
        raise KPMError(
            f"deep must be the DeepStates of these matrices ({n} orbitals, from "
            f"deflation.deep_states); got "
            f"{getattr(getattr(deep, 'basis', None), 'shape', type(deep).__name__)}"
        )
    return deep


def _bounds(H, S, chol, margin: float, deep: DeepStates | None = None) -> tuple[float, float]:
    """Bounds of the spectrum; with ``deep``, of the states that are not deep (the deep
    ones parked inside the rest of the spectrum, where they set neither end)."""
    n = H.shape[0]
    park = None if deep is None else _Park(deep, deep.interior)
    if n <= DENSE_MAX:
        Hd = H.toarray() if park is None else H.toarray() + park.dense()
        ev = scipy.linalg.eigh(Hd, S.toarray(), eigvals_only=True)
        lo, hi = float(ev[0]), float(ev[-1])
    else:
        # Lanczos on the Hermitian B = L^-1 H L^-H (real embedding [[Re, -Im], [Im, Re]]
        # for complex B: the same eigenvalues, doubled; real ARPACK is faster)
        embed = H.dtype.kind == "c" or S.dtype.kind == "c"

        def matvec(v):
            x = v[:n] + 1j * v[n:] if embed else v
            w = chol.lt_solve(x)
            y = chol.l_solve(H @ w if park is None else H @ w + park(w))
            return np.concatenate([y.real, y.imag]) if embed else y.real

        dim = 2 * n if embed else n
        v0 = np.random.default_rng(0).standard_normal(dim)
        # both ends in one run; Ritz values lie inside the spectrum, within about
        # tol * |E| of its ends (the residual bound): the widening below is at least
        # twice that (a DFT spectrum: |E| about the width, so 1 % of the width is ~10x)
        ev = _lanczos_ends(matvec, v0, BOUNDS_RTOL)
        lo, hi = float(ev.min()), float(ev.max())
    width = max(hi - lo, 1e-6 * max(abs(lo), abs(hi), 1.0))
    pad = margin * width
    if n > DENSE_MAX and margin > 0:  # never less than twice Lanczos's error bound
        pad = max(pad, 2.0 * BOUNDS_RTOL * max(abs(lo), abs(hi)))
    return lo - pad, hi + pad


def _lanczos_ends(matvec, v0, rtol: float, max_steps: int | None = None) -> np.ndarray:
    """(lowest, highest) Ritz values of the real symmetric operator ``matvec`` by Lanczos
    with full reorthogonalisation, stopped as soon as both residual bounds |beta_j s_ji|
    are at most ``rtol`` times the larger |Ritz value| (checked every other step: ARPACK
    checks only when it restarts, which cost up to twice the products).  Raises
    :class:`KPMError` after ``max_steps`` (default ``BOUNDS_MAX_STEPS``) steps."""
    max_steps = BOUNDS_MAX_STEPS if max_steps is None else int(max_steps)
    n = v0.size
    steps = min(max_steps, n)
    V = np.empty((steps + 1, n))
    V[0] = v0 / np.linalg.norm(v0)
    alpha, beta = np.empty(steps), np.empty(steps)
    theta = np.zeros(2)
    for j in range(steps):
        w = np.asarray(matvec(V[j]), dtype=np.float64).ravel()
        alpha[j] = V[j] @ w
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w -= V[: j + 1].T @ (V[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        done = beta[j] <= 1e-12 * max(abs(alpha[: j + 1]).max(), 1.0)  # invariant space
        if done or (j >= 3 and j % 2 == 1) or j == steps - 1:
            theta, S = scipy.linalg.eigh_tridiagonal(
                alpha[: j + 1], beta[:j], select="i", select_range=(0, j)
            )
            ends = [0, theta.size - 1]
            resid = np.abs(beta[j] * S[-1, ends])
            if done or resid.max() <= rtol * np.abs(theta[ends]).max():
                return theta[ends]
        V[j + 1] = w / beta[j]
    raise KPMError(
        f"spectral bounds: Lanczos did not converge in {steps} steps (Ritz values "
        f"{theta[0]:.4g} .. {theta[-1]:.4g})"
    )


def spectral_bounds(
    H,
    S,
    margin: float = BOUNDS_MARGIN,
    factor: CholeskyFactor | None = None,
    deep: DeepStates | None = None,
) -> tuple[float, float]:
    """(emin, emax) in eV of H c = E S c, widened by margin * (emax - emin) on each side.

    Dense ``eigh`` for n <= 200, otherwise Lanczos for both ends in one run (relative
    tolerance 3e-3, :func:`_lanczos_ends`) on L^-1 H L^-H, with L the sparse Cholesky factor of S;
    then a margin > 0 widens each side by at least 6e-3 * max |E| (twice Lanczos's
    error bound).  The KPM moments a resolution needs grow with the width: the default
    1 % margins need 7 % fewer than 5 % margins.  deep: the
    :class:`~.deflation.DeepStates` of H and S, whose states the bounds then leave out
    (pass the same to :func:`chebyshev_moments`).
    """
    if not margin >= 0:
        raise KPMError(f"margin must be >= 0; got {margin}")
    H, S, chol = _prepare(H, S, factor)
    return _bounds(H, S, chol, margin, _check_deep(deep, H.shape[0]))


@dataclass
class KPMMoments:
    """Chebyshev moments mu_m = Re Tr[P_g T_m((A - center) / half_width)], A = S^-1 H.

    moments: (n_groups + 1, M), row 0 the total (mu_0 = n_orbitals), then the
    groups in the order of ``names[1:]``.  center, half_width in eV; n_random is
    the number of random vectors (0 for the exact trace).  per_vector: (n_groups + 1,
    n_random, M), each random vector's own estimate (``moments`` is their mean), from
    which :func:`kpm_window_count` gives a standard error; None for the exact trace, and
    when they would exceed 2**24 numbers (e.g. the per-atom PDOS of a large structure).
    """

    moments: np.ndarray
    names: list[str]
    center: float
    half_width: float
    n_random: int
    n_orbitals: int
    per_vector: np.ndarray | None = None
    deep_energies: np.ndarray | None = None
    deep_weights: np.ndarray | None = None

    def rows(self, names) -> KPMMoments:
        """These moments restricted to the rows ``names`` (a list), deep states included."""
        i = [self.names.index(x) for x in names]
        return replace(
            self,
            moments=self.moments[i],
            names=[self.names[j] for j in i],
            per_vector=None if self.per_vector is None else self.per_vector[i],
            deep_weights=None if self.deep_weights is None else self.deep_weights[i],
        )

    def deep_states_below(self, energies, rows=(0,)) -> np.ndarray:
        """Deep states of the rows ``rows`` (indices, summed) below each of ``energies``
        (eV), each state broadened by a Gaussian of the Jackson resolution pi a / M
        (zeros without deep states)."""
        e = np.atleast_1d(np.asarray(energies, dtype=float))
        if self.deep_energies is None:
            return np.zeros(e.shape)
        sigma = np.pi * self.half_width / self.moments.shape[1]
        w = self.deep_weights[list(rows)].sum(axis=0)
        ed = self.deep_energies
        out = np.where(e > 0, w.sum(), 0.0)  # +-inf
        fin = np.isfinite(e)
        if not fin.any():
            return out
        ef = e[fin]
        # states 12 sigma below every energy count in full, without an erf
        full = ed < ef.min() - 12.0 * sigma
        near = np.flatnonzero(~full)
        part = np.full(ef.shape, w[full].sum())
        for i in range(0, near.size, 512):
            j = near[i : i + 512]
            z = (ef[:, None] - ed[j]) / sigma
            part += 0.5 * (1.0 + scipy.special.erf(z / np.sqrt(2.0))) @ w[j]
        out[fin] = part
        return out

    def deep_count(self, e_lo, e_hi, rows=(0,)) -> float:
        """Deep states of the rows ``rows`` (indices) in [e_lo, e_hi] eV (broadened as in
        :meth:`deep_states_below`; 0 without deep states)."""
        lo, hi = self.deep_states_below([e_lo, e_hi], rows)
        return float(hi - lo)


def _group_matrix(groups: dict[str, np.ndarray] | None, n: int) -> tuple[list[str], sp.csr_array]:
    """Rows of 0/1 weights: row 0 all orbitals, then one row per group."""
    names, rows = ["total"], [np.arange(n)]
    for name, idx in (groups or {}).items():
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
            raise KPMError(
                f"group {name!r} must be a non-empty 1D integer index array; "
                f"got shape {idx.shape}, dtype {idx.dtype}"
            )
        if idx.min() < 0 or idx.max() >= n:
            raise KPMError(
                f"group {name!r} indices must lie in [0, {n}); got range [{idx.min()}, {idx.max()}]"
            )
        names.append(str(name))
        rows.append(np.unique(idx))
    ptr = np.cumsum([0] + [len(r) for r in rows])
    cols = np.concatenate(rows)
    return names, sp.csr_array((np.ones(len(cols)), cols, ptr), shape=(len(rows), n))


def chebyshev_moments(
    H,
    S,
    n_moments: int = 512,
    n_random: int = 16,
    groups: dict[str, np.ndarray] | None = None,
    bounds=None,
    seed=0,
    exact: bool = False,
    block: int = 16,
    progress: bool = False,
    factor: CholeskyFactor | None = None,
    doubling: bool | None = None,
    deep: DeepStates | None = None,
    probe: tuple[int, Callable[[KPMMoments], int]] | None = None,
) -> KPMMoments:
    """Stochastic (or exact) Chebyshev moments of the total and group-projected DOS.

    groups: name -> integer orbital indices (a species, an atom...); groups may
    overlap and need not cover all orbitals.  bounds: (emin, emax) in eV that
    must enclose the spectrum (default: ``spectral_bounds(H, S)``); they map to
    x = -+(1 - 0.01).  Random vectors are real Rademacher (+-1), so mu_0 is exact;
    exact=True uses all n unit vectors instead (deterministic, O(n) vectors).
    block: number of vectors propagated together.  progress: tqdm bar over blocks
    if tqdm is importable.  factor: the :class:`CholeskyFactor` of S, if already made.
    doubling: two moments per Chebyshev step from T_2n = 2 T_n^2 - 1 and
    T_2n+1 = 2 T_n T_n+1 - T_1 (M // 2 steps instead of M - 1, the same estimates);
    each group then propagates one more block of start vectors w_g = L^-1 P_g L r
    (module docstring).  None (default): for the total alone and for one group (the
    cheaper way when solves are memory-bound, and no dearer otherwise); True: for every
    group (refused when a block of all those vectors would exceed 1 GiB); False: one
    moment per step.  deep: the :class:`~.deflation.DeepStates` of H and S (and
    ``bounds``, when given, from ``spectral_bounds(..., deep=deep)``): the moments are
    then those of H' = H + S C (emin - E_d) C^H S, whose deep states sit at emin, with
    each vector's exactly known part of them subtracted (its components along the deep
    Ritz vectors), so that the moments are those of the other states alone; the deep
    states come back in ``deep_energies`` and ``deep_weights`` (their Mulliken weights
    per row), which :func:`kpm_density`, :func:`kpm_window_count` and
    :func:`kpm_fermi_level` add (Gaussian of the Jackson resolution).  The interval
    then spans the other states alone: fewer moments for a resolution.
    probe: (m_probe, choose): the recursion stops after ``m_probe`` moments, ``choose``
    gets those moments (a :class:`KPMMoments`) and returns the final number, at most
    ``n_moments``; the recursion then goes on from where it stopped (the first moments
    do not depend on how many follow), so the probe costs nothing extra.  Stochastic
    moments only: every block's vectors are kept until the end.
    """
    _check_moments(n_moments)
    if not exact and (int(n_random) != n_random or n_random < 1):
        raise KPMError(f"n_random must be an integer >= 1; got {n_random}")
    if int(block) != block or block < 1:
        raise KPMError(f"block must be an integer >= 1; got {block}")
    H, S, chol = _prepare(H, S, factor)
    n = H.shape[0]
    names, G = _group_matrix(groups, n)
    deep = _check_deep(deep, n)
    if bounds is None:
        emin, emax = _bounds(H, S, chol, BOUNDS_MARGIN, deep)
    else:
        emin, emax = map(float, bounds)
    if not emin < emax:
        raise KPMError(f"bounds must satisfy emin < emax; got ({emin}, {emax})")
    b, a = 0.5 * (emin + emax), 0.5 * (emax - emin) / (1.0 - EDGE)

    single = chol.precision == "single"  # then H too is applied in single precision
    if single:
        H = H.astype(np.complex64 if H.dtype.kind == "c" else np.float32)
    Hp = BlockProduct(H)  # rows with equal columns (an atom's) read each block row once
    park = None if deep is None else _Park(deep, emin)  # the deep states at emin

    def apply(v):  # (B~ v, L^-H v), B~ = (L^-1 H' L^-H - b) / a
        w = chol.lt_solve(v, single=single)
        y = Hp @ w if park is None else Hp @ w + park(w)
        return (chol.l_solve(y) - b * v) / a, w

    n_vec = n if exact else int(n_random)
    starts = range(0, n_vec, int(block))
    M = int(n_moments)
    if doubling is not None and not isinstance(doubling, (bool, np.bool_)):
        raise KPMError(f"doubling must be True, False or None (automatic); got {doubling!r}")
    doubling = len(names) <= 2 if doubling is None else bool(doubling)
    k_max = min(int(block), n if exact else int(n_random))
    if doubling and len(names) * k_max * n > DOUBLING_MAX:
        raise KPMError(
            f"doubling with {len(names) - 1} groups propagates {len(names)} x {k_max} "
            f"vectors of {n} orbitals ({len(names) * k_max * n * 8 / 2**30:.1f} GiB per "
            f"array, four arrays): too many; use doubling=None (one moment per step for "
            f"several groups) or fewer groups"
        )
    n_steps = M // 2 if doubling else (M if len(names) > 1 else M - 1)  # B~ per block
    bar = None
    if progress:  # over Chebyshev steps of all blocks: its rate and ETA are the cost
        try:
            from tqdm import tqdm

            bar = tqdm(
                total=len(starts) * n_steps,
                desc=f"KPM ({n} orbitals, {n_vec} vectors, {int(n_moments)} moments)",
                unit="step",
                unit_scale=True,
                mininterval=1.0,
            )
        except ImportError:
            pass
    if probe is not None:
        if exact:
            raise KPMError("probe needs stochastic moments (exact=False)")
        m_probe, choose = probe
        if int(m_probe) != m_probe or not 2 <= m_probe <= M or not callable(choose):
            raise KPMError(
                f"probe must be (m_probe, choose) with 2 <= m_probe <= n_moments = {M} and "
                f"choose callable; got {probe!r}"
            )
    rng = np.random.default_rng(seed)
    # kept when small (not for the per-atom PDOS of a large structure): else summed
    keep = not exact and len(names) * n_vec * M <= PER_VECTOR_MAX
    Gg = G[1:]  # the groups, without the total row
    parked = []  # with deep: per vector, its weight on the parked states, per row
    runs = []  # per block, its recursion (vectors released once it is finished)
    Recursion = _DoublingRecursion if doubling else _PlainRecursion

    def finish(m_final):
        raw = [run.moments(m_final) for run in runs]
        w = None if deep is None else np.concatenate(parked, axis=1)
        return _assemble(
            raw, m_final, names, G, exact, keep, doubling, n_vec, (b, a), (emin, emax), deep, w
        )

    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
        target = M if probe is None else int(probe[0])
        for start in starts:
            k = min(int(block), n_vec - start)
            if exact:
                r = np.zeros((n, k))
                r[np.arange(start, start + k), np.arange(k)] = 1.0
            else:
                r = rng.integers(0, 2, size=(n, k)).astype(np.float64) * 2.0 - 1.0
            if deep is not None:
                parked.append(_parked_weights(deep, r, chol, S, Gg))
            run = Recursion(r, apply, M, bar, Gg, keep, chol, S)
            run.advance(target)
            if probe is None:
                run.release()
            runs.append(run)
        if probe is not None:
            chosen = choose(finish(target))
            if int(chosen) != chosen or chosen < 2:
                raise KPMError(f"probe's choose must return an integer >= 2; got {chosen!r}")
            M = min(int(chosen), M)
            if bar is not None:  # the steps the chosen count needs
                bar.total = len(starts) * (M // 2 if doubling else M)
                bar.set_description(f"KPM ({n} orbitals, {n_vec} vectors, {M} moments)")
            for run in runs:
                run.advance(M)
                run.release()
        if bar is not None:
            bar.update(bar.total - bar.n)
    if bar is not None:
        bar.close()
    return finish(M)


def _assemble(raw, M, names, G, exact, keep, doubling, n_vec, scale, bounds, deep, parked):
    """KPMMoments from the blocks' raw sums (each (rows, k or 1, >= M)), first M moments."""
    (b, a), (emin, emax) = scale, bounds
    n = G.shape[1]
    if keep:
        per_vector = np.concatenate([x[:, :, :M] for x in raw], axis=1)
        mu = None
    else:
        per_vector = None
        mu = sum(x[:, 0, :M] for x in raw)
        if not exact:
            mu = mu / n_vec
    Gg = G[1:]
    for x in (per_vector,) if keep else (mu,):
        if doubling:  # mu_2n = 2 X_n - mu_0, mu_2n+1 = 2 Y_n - mu_1 (X_0 = mu_0, Y_0 = mu_1)
            x[..., 2::2] = 2.0 * x[..., 2::2] - x[..., :1]
            x[..., 3::2] = 2.0 * x[..., 3::2] - x[..., 1:2]
        x[1:, ..., 0] = np.reshape(Gg.sum(axis=1), (-1,) + (1,) * (x.ndim - 2))
    # mu_0 = Tr P_g is known (above): the PDOS integrates exactly
    deep_weights = None
    if deep is not None:  # subtract each vector's exactly known parked part
        w = parked  # (rows, vectors)
        Tp = np.cos(np.arange(M) * np.arccos(np.clip((emin - b) / a, -1.0, 1.0)))
        deep_weights = deep.mulliken(G)
        mu0 = np.asarray(G.sum(axis=1)).ravel() - deep_weights.sum(axis=1)
        if keep:
            per_vector -= w[:, :, None] * Tp
            per_vector[:, :, 0] = mu0[:, None]
        else:
            mu -= (w.sum(axis=1) if exact else w.mean(axis=1))[:, None] * Tp
            mu[:, 0] = mu0
    if keep:
        mu = per_vector.mean(axis=1)
    if not np.all(np.isfinite(mu)) or np.abs(mu[0]).max() > 100.0 * n:
        raise KPMError(
            f"Chebyshev moments diverge (max |mu| = {np.abs(mu[0]).max():.3g} for "
            f"n = {n}): the bounds ({emin}, {emax}) do not enclose the spectrum"
        )
    return KPMMoments(
        mu,
        names,
        b,
        a,
        0 if exact else n_vec,
        n,
        per_vector,
        None if deep is None else deep.energies.copy(),
        deep_weights,
    )


def _parked_weights(deep: DeepStates, r, chol, S, Gg):
    """(rows, k): each vector's weight on the parked deep states, which its moments hold
    as weight * T_m(x_p): total sum_d |c_d^H L r|^2, group g sum_d conj(c_d^H P_g L r)
    c_d^H L r (the left vector of a group moment is L^-1 P_g L r, whose component
    along L^H c_d is c_d^H P_g L r)."""
    Lr = _times(S, chol.lt_solve(r))
    A = deep.components(Lr)
    out = np.empty((Gg.shape[0] + 1, r.shape[1]))
    out[0] = (A.conj() * A).real.sum(axis=0)
    for g in range(Gg.shape[0]):
        idx = Gg.indices[Gg.indptr[g] : Gg.indptr[g + 1]]
        val = Gg.data[Gg.indptr[g] : Gg.indptr[g + 1]]
        PLr = np.zeros_like(Lr)
        PLr[idx] = Lr[idx] * val[:, None]
        out[g + 1] = (deep.components(PLr).conj() * A).real.sum(axis=0)
    return out


def _bar_tick(bar, m):
    if bar is not None and m % 32 == 31:
        bar.update(32)


class _PlainRecursion:
    """One block's moments, one per step, computed in stages (:meth:`advance`): the total
    r^H v_m (B~ is Hermitian: the lowest-variance form); groups (L r)^H P_g L^-H v_m, an
    unbiased estimate of Tr[P_g T_m(S^-1 H)] (Mulliken), with L r = S L^-H r.  Raw sums
    (groups + 1, k, M) per vector, or (groups + 1, 1, M) summed over the block's vectors.
    Without groups v_m is made only when moment m is asked for (M - 1 steps for M)."""

    def __init__(self, r, apply, M, bar, Gg, per_vector, chol=None, S=None):
        self.r, self.apply, self.bar, self.Gg, self.S = r, apply, bar, Gg, S
        self.per_vector = per_vector
        self.out = np.zeros((Gg.shape[0] + 1, r.shape[1] if per_vector else 1, M))
        self.prev, self.cur, self.have, self.done, self.Lr = None, r, 0, 0, None

    def _push(self, nxt):  # v_have+1 = 2 B~ v_have - v_have-1
        self.prev, self.cur = self.cur, (nxt if self.prev is None else 2.0 * nxt - self.prev)
        self.have += 1
        _bar_tick(self.bar, self.have - 1)

    def advance(self, M):
        out, Gg = self.out, self.Gg
        for m in range(self.done, min(M, out.shape[2])):
            if self.have < m:  # without groups: v_m from v_m-1, when needed
                self._push(self.apply(self.cur)[0])
            total = np.einsum("ib,ib->b", self.r, self.cur.real)
            out[0, :, m] = total if self.per_vector else total.sum()
            if Gg.shape[0]:
                nxt, u = self.apply(self.cur)  # u = L^-H v_m comes with the step
                if self.Lr is None:
                    self.Lr = (self.S @ u).conj()
                if self.per_vector:
                    out[1:, :, m] = Gg @ (self.Lr * u).real
                else:
                    out[1:, 0, m] = Gg @ np.einsum("ib,ib->i", self.Lr, u).real
                self._push(nxt)
            self.done = m + 1

    def moments(self, M):
        if self.done < M:
            raise KPMError(f"internal: {self.done} moments computed, {M} asked for")
        return self.out[:, :, :M]

    def release(self):  # finished: drop the vectors, keep the moments
        self.prev = self.cur = self.r = self.Lr = None


class _DoublingRecursion(_PlainRecursion):
    """One block's moments, two per step, computed in stages: the total, mu_2n = 2 v_n^H v_n -
    mu_0 and mu_2n+1 = 2 v_n^H v_n+1 - mu_1 with v_n = T_n(B~) r, the same numbers as
    r^H T_m(B~) r; each group g (rows of ``Gg``), from w_g = L^-1 P_g L r propagated
    alongside, mu_2n = 2 (T_n w_g)^H v_n - mu_0 and mu_2n+1 = 2 (T_n+1 w_g)^H v_n - mu_1,
    the same numbers as :class:`_PlainRecursion`.  Raw sums, (groups + 1, k, M) per
    vector or (groups + 1, 1, M) over the block, X_n in column 2n and Y_n in 2n + 1
    (M // 2 steps for M moments)."""

    def __init__(self, r, apply, M, bar, Gg, per_vector, chol=None, S=None):
        super().__init__(r, apply, M + 1, bar, Gg, per_vector, chol, S)
        self.k = k = r.shape[1]
        self.n_groups = n_groups = Gg.shape[0]
        if n_groups:  # w_g = L^-1 P_g L r, with L r = S L^-H r
            Lr = _times(S, chol.lt_solve(r))
            PLr = np.zeros((r.shape[0], n_groups * k), dtype=Lr.dtype)
            for g in range(n_groups):  # P_g L r from the sparse rows of the group weights
                idx = Gg.indices[Gg.indptr[g] : Gg.indptr[g + 1]]
                val = Gg.data[Gg.indptr[g] : Gg.indptr[g + 1]]
                PLr[idx, g * k : (g + 1) * k] = Lr[idx] * val[:, None]
            self.cur = np.concatenate([r, chol.l_solve(PLr)], axis=1)  # one solve for all
        self.recorded = False  # whether the moments of v_have are in ``out``

    def _sums(self, x, v):  # per row and vector: [v^H v, (w_g^H v per group)], x = [v, w_1, ...]
        k = self.k
        each = np.einsum("inb,ib->nb", x.reshape(x.shape[0], self.n_groups + 1, k).conj(), v).real
        return each if self.per_vector else each.sum(axis=1, keepdims=True)

    def advance(self, M):
        out, k = self.out, self.k
        while self.done < min(M, out.shape[2] - 1):
            if self.recorded:  # the next vector
                self._push(self.apply(self.cur)[0])
                self.recorded = False
            m, cur = self.have, self.cur
            out[:, :, 2 * m] = self._sums(cur, cur[:, :k])
            if m:
                out[:, :, 2 * m - 1] = self._sums(cur, self.prev[:, :k])
            self.recorded = True
            self.done = 2 * m + 1


def _check_moments(n_moments) -> int:
    if int(n_moments) != n_moments or n_moments < 2:
        raise KPMError(f"n_moments must be an integer >= 2; got {n_moments}")
    return int(n_moments)


def jackson_kernel(n_moments: int) -> np.ndarray:
    """Jackson damping factors g_m, m = 0..M-1 (Weisse et al. 2006, eq. 71, N = M)."""
    M = _check_moments(n_moments)
    m = np.arange(M)
    q = np.pi / (M + 1)
    return ((M - m + 1) * np.cos(q * m) + np.sin(q * m) / np.tan(q)) / (M + 1)


def kpm_density(moments: KPMMoments, energies) -> dict[str, np.ndarray]:
    """name -> Jackson-damped DOS (states/eV, per spin channel) on ``energies`` (eV).

    rho(E) = [g_0 mu_0 + 2 sum_m g_m mu_m T_m(x)] / (pi a sqrt(1 - x^2)),
    x = (E - center) / half_width; zero for |x| >= 1.  Deep states (``deep_energies``)
    are added as Gaussians of the Jackson resolution pi a / M.
    """
    E = np.asarray(energies, dtype=np.float64)
    x = ((E - moments.center) / moments.half_width).ravel()
    mu = moments.moments
    coef = mu * jackson_kernel(mu.shape[1])
    coef[:, 1:] *= 2.0
    out = np.zeros((mu.shape[0], x.size))
    inside = np.flatnonzero(np.abs(x) < 1.0)
    m = np.arange(mu.shape[1])
    for chunk in np.array_split(inside, max(1, inside.size // 1024)):
        xc = x[chunk]
        T = np.cos(np.outer(np.arccos(xc), m))  # T_m(x) = cos(m arccos x)
        out[:, chunk] = (coef @ T.T) / (np.pi * moments.half_width * np.sqrt(1.0 - xc**2))
    if moments.deep_energies is not None:  # deep states: Gaussians of the resolution
        sigma = np.pi * moments.half_width / mu.shape[1]
        Ef = E.ravel()
        for i in range(0, moments.deep_energies.size, 512):
            z = (Ef[:, None] - moments.deep_energies[i : i + 512]) / sigma
            g = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2.0 * np.pi))
            out += moments.deep_weights[:, i : i + 512] @ g.T
    return {name: row.reshape(E.shape) for name, row in zip(moments.names, out)}


def kpm_window_count(
    moments: KPMMoments, emin: float, emax: float, name="total"
) -> tuple[float, float | None]:
    """(count, standard error): the states per spin channel of row ``name`` (``'total'`` or
    a group; a list of groups: their sum) with energies in [emin, emax] eV, the
    Jackson-damped density of :func:`kpm_density` integrated exactly (x = cos t:
    each T_m integrates to sin(m t) / m). The standard error is the spread of the
    random vectors' own counts over sqrt(n_random), the stochastic part of the error
    (the kernel's broadening is not in it); None for the exact trace or a single
    vector."""
    rows = [name] if isinstance(name, str) else list(name)
    missing = [x for x in rows if x not in moments.names]
    if not rows:
        raise KPMError(f"name must be a row or a non-empty list of rows of {moments.names}")
    if missing:
        what = ", ".join(map(repr, missing))
        raise KPMError(f"no row(s) {what} in these moments; they have {moments.names}")
    emin, emax = float(emin), float(emax)
    if not emin < emax:
        raise KPMError(f"need emin < emax; got [{emin}, {emax}] eV")
    x = np.clip((np.array([emin, emax]) - moments.center) / moments.half_width, -1.0, 1.0)
    t_lo, t_hi = np.arccos(x)  # t_lo >= t_hi
    M = moments.moments.shape[1]
    m = np.arange(1, M)
    c = np.empty(M)
    c[0] = t_lo - t_hi
    c[1:] = 2.0 * (np.sin(m * t_lo) - np.sin(m * t_hi)) / m
    c *= jackson_kernel(M) / np.pi
    i = [moments.names.index(x) for x in rows]
    deep = moments.deep_count(emin, emax, i)  # exact: the same for every vector
    count = float(moments.moments[i].sum(axis=0) @ c) + deep
    pv = moments.per_vector
    if pv is None or pv.shape[1] < 2:
        return count, None
    each = pv[i].sum(axis=0) @ c + deep  # one count per random vector
    return count, float(each.std(ddof=1) / np.sqrt(len(each)))


def kpm_fermi_window_count(
    moments: KPMMoments,
    n_electrons: float,
    window: float,
    name="total",
    fermi_moments: KPMMoments | None = None,
) -> tuple[float, float | None, float]:
    """(count, standard error, E_F): the states per spin channel of row(s) ``name`` in
    [E_F, E_F + window] eV (:func:`kpm_window_count`), with E_F from
    :func:`kpm_fermi_level` of ``fermi_moments`` (default: the total row of ``moments``;
    both must come from the same random vectors, as the calculator's do).

    The standard error is a jackknife over the random vectors: each vector is left out
    in turn, E_F and the count are computed again from the others, and the error is
    sqrt((n - 1) / n * sum (count_i - mean)^2).  So E_F's own stochastic error is in it,
    which the count at a fixed E_F leaves out.  None without per-vector moments."""
    fm = moments if fermi_moments is None else fermi_moments
    if not (isinstance(window, (int, float, np.integer, np.floating)) and window > 0):
        raise KPMError(f"window must be a number of eV > 0; got {window!r}")
    if fm.n_random != moments.n_random or fm.n_orbitals != moments.n_orbitals:
        raise KPMError(
            f"fermi_moments must come from the same random vectors as moments; got "
            f"{fm.n_random} and {moments.n_random} vectors, {fm.n_orbitals} and "
            f"{moments.n_orbitals} orbitals"
        )
    fm = replace(fm.rows(fm.names[:1]), per_vector=None)
    ef = kpm_fermi_level(fm, n_electrons)
    count, _ = kpm_window_count(moments, ef, ef + window, name)
    pv = moments.per_vector
    fpv = (fermi_moments or moments).per_vector
    n = moments.n_random
    if pv is None or fpv is None or n < 2:
        return count, None, ef
    loo = np.empty(n)
    for v in range(n):  # leave vector v out
        others = np.arange(n) != v
        e_v = kpm_fermi_level(replace(fm, moments=fpv[:1, others].mean(axis=1)), n_electrons)
        m_v = replace(moments, moments=pv[:, others].mean(axis=1), per_vector=None)
        loo[v] = kpm_window_count(m_v, e_v, e_v + window, name)[0]
    return count, float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())), ef


class KPMResolutionWarning(UserWarning):
    """The KPM DOS is broader than the width asked for (the moment count is capped)."""


def _scaled(bounds, energy):
    """(a, x): the half-width (eV) of the Chebyshev mapping of ``bounds`` and the scaled
    position of ``energy`` (eV) in it (x = 0 for None: the centre)."""
    emin, emax = map(float, bounds)
    if not emin < emax:
        raise KPMError(f"bounds must satisfy emin < emax; got ({emin}, {emax})")
    a = 0.5 * (emax - emin) / (1.0 - EDGE)
    if energy is None:
        return a, 0.0
    return a, float(np.clip((float(energy) - 0.5 * (emin + emax)) / a, -1.0, 1.0))


def kpm_resolution(bounds, n_moments: int, energy: float | None = None) -> float:
    """Energy resolution (eV) of the Jackson kernel with ``n_moments`` moments: pi a / M
    at the centre of the interval (a its half-width), the coarsest; at ``energy`` (eV,
    scaled position x) narrower by sqrt(1 - x^2 (M - 1) / M), the ratio of the kernel's
    standard deviations there and at the centre (Weisse et al., Rev. Mod. Phys. 78, 275
    (2006), Jackson kernel)."""
    M = _check_moments(n_moments)
    a, x = _scaled(bounds, energy)
    centre = np.pi * 0.5 * (float(bounds[1]) - float(bounds[0])) / (1.0 - EDGE) / M
    return float(centre * np.sqrt(1.0 - x * x * (M - 1) / M))


def kpm_n_moments(
    bounds,
    resolution: float,
    min_moments: int = 64,
    max_moments: int = 8192,
    energies: tuple[float, float] | None = None,
) -> int:
    """Number of moments M whose Jackson resolution is about ``resolution`` eV for a
    spectrum within ``bounds`` = (emin, emax), clipped to [min_moments, max_moments]:
    pi * a / M = resolution (a = (emax - emin) / 2), the resolution at the centre of the
    interval and so everywhere; with ``energies`` = (lo, hi) eV the fewest moments whose
    :func:`kpm_resolution` is at most ``resolution`` from lo to hi (the kernel is
    narrower towards the ends of the interval: near E_F far from the centre fewer
    moments give the same resolution there)."""
    emin, emax = map(float, bounds)
    if not emin < emax:
        raise KPMError(f"bounds must satisfy emin < emax; got ({emin}, {emax})")
    if not resolution > 0:
        raise KPMError(f"resolution must be > 0 eV; got {resolution}")
    if energies is None:
        a = 0.5 * (emax - emin)
        return int(np.clip(np.ceil(np.pi * a / resolution), min_moments, max_moments))
    lo, hi = map(float, energies)
    if not lo <= hi:
        raise KPMError(f"energies must be (lo, hi) with lo <= hi; got ({lo}, {hi})")
    centre = 0.5 * (emin + emax)
    at = float(np.clip(centre, lo, hi))  # the coarsest point of [lo, hi]
    a, x = _scaled(bounds, at)
    m = max(2, int(np.ceil(np.pi * a * np.sqrt(1.0 - x * x) / resolution)))
    while kpm_resolution(bounds, m, at) > resolution:  # the (M - 1) / M term
        m += 1
    return int(np.clip(m, min_moments, max_moments))


def kpm_fermi_level(
    moments: KPMMoments, n_electrons: float, nspins: int = 1, npts: int = 20001
) -> float:
    """Zero-temperature Fermi level (eV) from the integrated total KPM DOS.

    The total DOS (per spin channel, row 0 of ``moments``) is integrated on
    ``npts`` points across the spectral bounds (deep states added, if any); the Fermi level is where
    it holds ``n_electrons / (2 / nspins)`` states (linear interpolation).  A
    pure function of the moments: the same moments give the same level.
    """
    if int(npts) != npts or npts < 2:
        raise KPMError(f"npts must be an integer >= 2; got {npts}")
    n_states = float(n_electrons) * nspins / 2.0
    if not 0.0 <= n_states <= moments.n_orbitals:
        raise KPMError(
            f"{n_electrons} electrons do not fit into {moments.n_orbitals} "
            f"orbitals ({2 // nspins} electrons per orbital)"
        )
    # the bounds (x = -+(1 - EDGE)), which hold every state: beyond them the kernel's
    # 1 / sqrt(1 - x^2) makes any rounding of the moments' tails a spike at x = -+1
    half = moments.half_width * (1.0 - EDGE)
    e = np.linspace(moments.center - half, moments.center + half, int(npts))
    dos = kpm_density(replace(moments, deep_energies=None), e)["total"]
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (dos[1:] + dos[:-1]) * np.diff(e))])
    if moments.deep_energies is not None:  # deep states up to each energy
        cum = cum + moments.deep_states_below(e)
    cum = np.maximum.accumulate(cum)  # stochastic moments can dip below zero
    return float(np.interp(n_states, cum, e))


def kpm_dos(
    H,
    S,
    energies=None,
    n_moments: int = 512,
    n_random: int = 16,
    groups=None,
    seed=0,
    exact: bool = False,
    npts: int = 2001,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(energies in eV, {'total': DOS, group: PDOS, ...}) in states/eV.

    Default energies: ``npts`` points spanning ``spectral_bounds(H, S)``.
    """
    bounds = spectral_bounds(H, S)
    mom = chebyshev_moments(
        H, S, n_moments, n_random, groups, bounds=bounds, seed=seed, exact=exact
    )
    E = np.linspace(*bounds, int(npts)) if energies is None else np.asarray(energies, float)
    return E, kpm_density(mom, E)


def moments_from_eigen(
    eigenvalues, weights, center: float, half_width: float, n_moments: int
) -> np.ndarray:
    """Exact moments mu_m = sum_k w_k T_m((E_k - center) / half_width).

    eigenvalues (n,) in eV; weights (n_groups + 1, n) Mulliken weights per group
    (row 0 all ones for the total) or (n,).  Returns (n_groups + 1, n_moments).
    """
    _check_moments(n_moments)
    x = (np.asarray(eigenvalues, dtype=np.float64) - center) / half_width
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != x.size:
        raise KPMError(f"weights must have shape (n_groups + 1, {x.size}); got {w.shape}")
    T = np.empty((int(n_moments), x.size))
    T[0], T[1] = 1.0, x
    for m in range(2, int(n_moments)):
        T[m] = 2.0 * x * T[m - 1] - T[m - 2]
    return w @ T.T
