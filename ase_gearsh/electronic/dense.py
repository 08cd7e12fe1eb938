"""Electronic structure from (H, S): eigenvalues, Fermi level, DOS and Mulliken PDOS.

numpy/scipy only.  Energies in eV.  DOS are per spin channel (states/eV): the
total DOS integrates to the number of orbitals, each projected DOS to the
Mulliken population of its orbitals (the projections sum to the total DOS).

Fermi level: Fermi-Dirac occupations ``f = 1 / (1 + exp((e - mu) / width))``
with ``2 / nspins`` electrons per state and the k-point weights, solved for the
valence electron count by bisection.  When the states are separated by a gap
at ``mu`` (zero-temperature filling is exact) the level is placed mid-gap, as
GPAW does for insulators.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from ..core.errors import GearsHError

__all__ = [
    "solve_dense",
    "coefficient_norms",
    "NEAR_NULL_NORM",
    "check_overlap_cutoff",
    "overlap_rank",
    "fermi_level",
    "fermi_dirac",
    "occupation_numbers",
    "gaussian_dos",
    "energy_grid",
    "mulliken_weights",
    "group_matrix",
    "time_reversal_reduce",
    "ElectronicError",
]


class ElectronicError(GearsHError, ValueError):
    """Inputs that do not describe a solvable electronic-structure problem."""


# |c|^2 of an S-normalised eigenvector above which a level lies along S's near-null
# directions.  Measured on the held-out WSe2 cell (szp(dzp), S's smallest eigenvalue
# 3.7e-4; ``gearsh eval``): GPAW's occupied levels and those within E_F +- 5 eV have
# |c|^2 <= 3.4 and none below the window exceeds 20; a predicted H with 29 spurious
# levels below the window has 26 occupied levels above 50.
NEAR_NULL_NORM = 50.0


def mulliken_weights(C: np.ndarray, S) -> np.ndarray:
    """w[mu, n] = Re(conj(C[mu, n]) (S C)[mu, n]); columns sum to 1 for S-normalised C."""
    SC = S @ C
    return np.real(np.conj(C) * SC)


def group_matrix(labels, n_groups: int | None = None):
    """Sparse (n_groups, n_orbitals) 0/1 matrix from one integer label per orbital."""
    labels = np.asarray(labels, np.int64)
    n_groups = int(labels.max()) + 1 if n_groups is None else n_groups
    return sp.csr_matrix(
        (np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n_groups, len(labels))
    )


def check_overlap_cutoff(value) -> float:
    """Require an overlap cut-off (a threshold on S's eigenvalues) in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ElectronicError(
            f"overlap_cutoff must be a number in [0, 1) (a threshold on the eigenvalues "
            f"of S), got {value!r}"
        )
    if not 0.0 <= float(value) < 1.0:
        raise ElectronicError(
            f"overlap_cutoff must lie in [0, 1) (a threshold on the eigenvalues of S; "
            f"1e-3 removes near-linear dependences), got {value}"
        )
    return float(value)


def solve_dense(H, S, groups=None, overlap_cutoff: float = 0.0, n_keep: int | None = None):
    """Generalised eigenproblem H c = e S c, dense LAPACK.

    ``groups``: optional sparse (G, M) orbital-to-group matrix; then also returns
    the Mulliken weights of every state per group, (G, M).

    ``overlap_cutoff`` > 0: canonical orthogonalisation.  The eigenvectors of S with
    eigenvalues below the cut-off (near-linear dependences of the basis) are left out
    and H is solved in the rest, so M - m eigenvalues come back (``n_keep``: keep
    exactly that many directions, the largest eigenvalues of S, instead).  An
    error dH of H enters an eigenvalue through c^H dH c, and S-normalised c are
    as large as 1 / sqrt(lambda_min(S)) along those directions: with a nearly
    singular S (WSe2 in szp(dzp): lambda_min 4e-4) the small errors of a predicted H
    shift the levels by far more than the H error itself (docs/inference.md).
    """
    Hd, Sd = _dense_pair(H, S)
    overlap_cutoff = check_overlap_cutoff(overlap_cutoff)
    if overlap_cutoff > 0 or n_keep is not None:
        return _solve_canonical(Hd, Sd, groups, overlap_cutoff, n_keep)
    try:
        if groups is None:
            return sla.eigh(Hd, Sd, eigvals_only=True), None
        e, C = sla.eigh(Hd, Sd)
    except np.linalg.LinAlgError as err:
        raise ElectronicError(
            f"S is not positive definite ({err}); the overlap of the "
            f"basis functions is singular for this geometry (atoms "
            f"on top of each other?)"
        ) from None
    return e, np.asarray(groups @ mulliken_weights(C, Sd))


def _dense_pair(H, S):
    """H and S as dense arrays, checked to be square and of equal shape."""
    Hd = H.toarray() if hasattr(H, "toarray") else np.asarray(H)
    Sd = S.toarray() if hasattr(S, "toarray") else np.asarray(S)
    if Hd.shape != Sd.shape or Hd.ndim != 2 or Hd.shape[0] != Hd.shape[1]:
        raise ElectronicError(
            f"H and S must be square and of equal shape, got {Hd.shape} and {Sd.shape}"
        )
    return Hd, Sd


def coefficient_norms(H, S, overlap_cutoff: float = 0.0, groups=None):
    """(eigenvalues, |c_n|^2, Mulliken weights per group or None) of H c = e S c with
    S-normalised eigenvectors c_n (``groups``: as for :func:`solve_dense`).

    |c_n|^2 (the Euclidean norm) is of order 1 for a level built from well-conditioned
    combinations of the basis functions and about 1 / s for one along an eigenvector of
    S with a small eigenvalue s.  A consistent (DFT) H puts such directions high in the
    spectrum; small errors of a predicted H can bring them down among the occupied
    levels as spurious levels (``NEAR_NULL_NORM``; docs/inference.md).  With
    ``overlap_cutoff`` the eigenvectors are those of the canonical orthogonalisation
    (:func:`solve_dense`)."""
    Hd, Sd = _dense_pair(H, S)
    overlap_cutoff = check_overlap_cutoff(overlap_cutoff)
    if overlap_cutoff > 0:
        e, C = _solve_canonical(Hd, Sd, None, overlap_cutoff, None, vectors=True)
    else:
        try:
            e, C = sla.eigh(Hd, Sd)
        except np.linalg.LinAlgError as err:
            raise ElectronicError(f"S is not positive definite ({err})") from None
    weights = None if groups is None else np.asarray(groups @ mulliken_weights(C, Sd))
    return e, (np.abs(C) ** 2).sum(axis=0), weights


def overlap_rank(S, overlap_cutoff: float) -> int:
    """The number of eigenvalues of S at or above ``overlap_cutoff``."""
    Sd = S.toarray() if hasattr(S, "toarray") else np.asarray(S)
    return int((sla.eigvalsh(Sd) >= overlap_cutoff).sum())


def _solve_canonical(Hd, Sd, groups, cutoff, n_keep, vectors: bool = False):
    lam, U = sla.eigh(Sd)
    if lam[0] <= 0 and cutoff <= 0:
        raise ElectronicError(
            f"S is not positive definite (smallest eigenvalue {lam[0]:.3g}); the overlap of "
            f"the basis functions is singular for this geometry (atoms on top of each other?)"
        )
    keep = int((lam >= cutoff).sum()) if n_keep is None else int(n_keep)
    if not 1 <= keep <= len(lam):
        raise ElectronicError(
            f"overlap_cutoff {cutoff:g} leaves {keep} of {len(lam)} directions of S "
            f"(its eigenvalues span {lam[0]:.3g} to {lam[-1]:.3g}); expected at least one"
        )
    if lam[len(lam) - keep] <= 0:  # n_keep asked for a direction S does not span
        raise ElectronicError(
            f"{keep} directions of S asked for, but only {int((lam > 0).sum())} of its "
            f"eigenvalues are positive (smallest {lam[0]:.3g})"
        )
    X = U[:, len(lam) - keep :] / np.sqrt(lam[len(lam) - keep :])
    Hp = X.conj().T @ Hd @ X
    Hp = 0.5 * (Hp + Hp.conj().T)
    if groups is None and not vectors:
        return sla.eigvalsh(Hp), None
    e, Y = sla.eigh(Hp)
    if vectors:
        return e, X @ Y
    return e, np.asarray(groups @ mulliken_weights(X @ Y, Sd))


def fermi_dirac(eigenvalues, mu: float, width: float) -> np.ndarray:
    """Fermi-Dirac occupation 0..1 of each state; ``width`` 0 gives the step (1/2 at mu)."""
    eps = np.asarray(eigenvalues, float)
    if width > 0:
        return 1.0 / (1.0 + np.exp(np.clip((eps - mu) / width, -200.0, 200.0)))
    return (eps < mu).astype(float) + 0.5 * (eps == mu)


def occupation_numbers(
    eigenvalues, fermi_level: float, width: float, nspins: int = 1
) -> np.ndarray:
    """Occupations per state, 0..2 / nspins (no k-point weight), at ``fermi_level`` eV.

    With the Fermi level of :func:`fermi_level` (same ``width``),
    ``sum_k w_k occupation_numbers(eps[k]).sum()`` is the electron count.
    """
    if not width >= 0:
        raise ElectronicError(f"smearing width must be >= 0 eV, got {width}")
    return (2.0 / nspins) * fermi_dirac(eigenvalues, fermi_level, width)


def _occupied(eps, weights, mu, width, per_state):
    return per_state * float((weights[:, None] * fermi_dirac(eps, mu, width)).sum())


def fermi_level(
    eigenvalues,
    weights,
    n_electrons: float,
    width: float = 0.01,
    nspins: int = 1,
    tol: float = 1e-10,
) -> float:
    """Chemical potential (eV) that holds ``n_electrons`` (see module docstring).

    ``eigenvalues`` (nk, nbands) or (nspins, nk, nbands); ``weights`` (nk,) sum to 1.
    """
    eps = np.asarray(eigenvalues, float)
    w = np.asarray(weights, float)
    if eps.ndim == 3:
        eps = eps.reshape(-1, eps.shape[-1])
        w = np.tile(w, nspins)
    per_state = 2.0 / nspins
    capacity = per_state * float(w.sum()) * eps.shape[-1]
    if not 0 <= n_electrons <= capacity + 1e-9:
        raise ElectronicError(
            f"{n_electrons} electrons do not fit into "
            f"{eps.shape[-1]} states per k-point (capacity {capacity:g})"
        )
    if width < 0:
        raise ElectronicError(f"smearing width must be >= 0 eV, got {width}")
    lo, hi = eps.min() - 10 * width - 1.0, eps.max() + 10 * width + 1.0
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        if _occupied(eps, w, mu, width, per_state) < n_electrons:
            lo = mu
        else:
            hi = mu
        if hi - lo < tol:
            break
    mu = 0.5 * (lo + hi)
    # mid-gap for insulators: integer filling with a gap around mu
    flat = eps.ravel()
    # split at hi (holds n_electrons): with width 0, mu may end just below the HOMO
    below, above = flat[flat <= hi], flat[flat > hi]
    if len(below) and len(above):
        homo, lumo = below.max(), above.min()
        n0 = _occupied(eps, w, 0.5 * (homo + lumo), 0.0, per_state)
        if abs(n0 - n_electrons) < 1e-6 and lumo - homo > 20 * width:
            return float(0.5 * (homo + lumo))
    return float(mu)


def gaussian_dos(eigenvalues, weights, energies, width: float, spectral=None, chunk: int = 4096):
    """Gaussian-broadened DOS on ``energies`` (states/eV, per spin channel).

    ``eigenvalues`` (nk, nb), ``weights`` (nk,).  ``spectral``: optional
    (nk, G, nb) weights per state (e.g. Mulliken); then returns (G, npts).
    """
    if width <= 0:
        raise ElectronicError(f"DOS broadening width must be > 0 eV, got {width}")
    eps = np.asarray(eigenvalues, float)
    energies = np.asarray(energies, float)
    out = None
    norm = 1.0 / (np.sqrt(2 * np.pi) * width)
    for k, wk in enumerate(np.asarray(weights, float)):
        for a in range(0, eps.shape[1], chunk):
            e = eps[k, a : a + chunk]
            g = norm * np.exp(-0.5 * ((energies[None, :] - e[:, None]) / width) ** 2)
            part = wk * (g.sum(0) if spectral is None else spectral[k][:, a : a + chunk] @ g)
            out = part if out is None else out + part
    return out


def energy_grid(emin, emax, npts: int, lo: float, hi: float, pad: float = 0.0) -> np.ndarray:
    """``npts`` energies (eV) from ``emin`` to ``emax``; a bound left ``None`` is the
    spectrum's edge ``lo``/``hi`` widened by ``pad``."""
    emin = lo - pad if emin is None else float(emin)
    emax = hi + pad if emax is None else float(emax)
    if int(npts) != npts or npts < 2:
        raise ElectronicError(f"npts must be an integer >= 2, got {npts}")
    if not emax > emin:
        raise ElectronicError(f"need emin < emax, got emin={emin}, emax={emax}")
    return np.linspace(emin, emax, int(npts))


def time_reversal_reduce(kpts, tol: float = 1e-8, return_map: bool = False):
    """Merge k and -k (modulo reciprocal lattice vectors): (ibz_kpts, weights).

    H(-k) = conj(H(k)) for real H(R), so both have the same eigenvalues and
    Mulliken weights.  Order of first appearance is kept; weights sum to 1.
    ``return_map``: also return the IBZ index of every input k-point.
    """
    k = np.asarray(kpts, float).reshape(-1, 3)
    scale = 1.0 / tol

    def wrapped(x):
        x = np.round((x - np.floor(x + 0.5 * tol)) * scale).astype(np.int64)
        return np.where(x >= int(round(scale)), 0, x)

    a, b = wrapped(k), wrapped(-k)
    # canonical representative of {k, -k}: the lexicographically smaller one
    first = np.argmax(a != b, axis=1)
    rows = np.arange(len(k))
    use_b = (a != b).any(axis=1) & (b[rows, first] < a[rows, first])
    key = np.where(use_b[:, None], b, a)
    _, index, inverse, counts = np.unique(
        key, axis=0, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.argsort(index)  # order of first appearance
    w = counts[order].astype(float)
    if not return_map:
        return k[index[order]], w / w.sum()
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return k[index[order]], w / w.sum(), rank[np.ravel(inverse)]
