"""Deep (semicore) states taken out of the KPM interval.

The Chebyshev moments a resolution needs grow with the width of the spectrum.  Semicore
levels in the basis make it wide: GPAW's H for a 120-atom piece of the WSe2/HfO2:Ni
device spans 135 eV, of which W 5s, Ni 3p, Hf 5s, W 5p and Hf 5p take the lowest 54 eV
(``benchmarks/device_piece.py``), so a third of the moments would resolve states nobody
looks at.  Those states are atomic-like and separated from the rest by a wide gap, so
their invariant subspace is found locally:

1. every atom's diagonal blocks (H_aa, S_aa) are diagonalised; the atomic levels below
   ``below`` eV are the deep ones, one column q of a localised basis Q each;
2. each column is projected on the deep states of a cluster: its atom and the atoms on
   which its residual (H - e S) q exceeds ``tol`` eV (dense eigenproblem of the
   cluster's blocks; the cluster must have exactly as many states below ``below`` as
   its atoms have deep atomic levels, else the threshold cuts a band);
3. Rayleigh-Ritz in span(Q): the deep energies E_d and S-orthonormal Ritz vectors
   C = Q Y.

The KPM (:mod:`.kpm`) then runs on H' = H + S C (E_p - diag(E_d)) C^H S, in which the
deep states sit at one energy E_p (the lower end of the other states' bounds) and, for
an exact invariant subspace, every other eigenpair is that of H.  The deep states' own
part is known exactly (E_d and their Mulliken weights) and is added back to the DOS, the
window counts and the Fermi level.  An approximate subspace, with principal angle delta
to the exact one, moves the other levels by about |E_p - E_d| delta^2 (second order):
on the device piece the levels within 5 eV of E_F moved by at most 1e-4 eV with the
clusters, against 1e-2 eV with the atomic levels alone (``tests/test_deflation.py``
checks the levels against dense solves).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from ..core.compiled import compiled
from ..core.errors import GearsHError
from ..core.processes import usable_cores
from ..core.threads import single_threaded_blas
from .sparse_products import times as _times

__all__ = ["AUTO_GAP", "DeepStates", "DeflationError", "auto_threshold", "deep_states"]

AUTO_GAP = 8.0  # eV: the gap in the atomic levels below which ``below='auto'`` cuts
AUTO_DEPTH = 10.0  # eV: ... at least this far below the median atomic level
AUTO_FRACTION = 0.3  # ... leaving at most this fraction of the levels under it


class DeflationError(GearsHError, ValueError):
    """Invalid input to :func:`deep_states`."""


@dataclass
class DeepStates:
    """The deep states of H c = E S c, found locally (:func:`deep_states`).

    basis: Q (n, m) sparse, the localised basis; s_basis: S Q (n, m) sparse, without
    its elements below ``drop`` of their column's largest; energies: (m,) Ritz values in
    eV, ascending; vectors: Y (m, m), Ritz vectors C = Q Y with C^H S C = 1; below: the
    threshold (eV); residual: max over up to 64 Ritz pairs spread over the deep spectrum
    of ||(H - E S) c|| / ||S c|| (eV), from which the principal angle to the exact deep
    subspace is about residual / gap; gap: the distance (eV) from the highest deep Ritz
    value to the lowest atomic level that is not deep; interior: the median of the
    atomic levels that are not deep (eV), inside the rest of the spectrum, where the
    spectral bounds park the deep states so that they set neither end."""

    basis: sp.csc_array
    s_basis: sp.csc_array
    energies: np.ndarray
    vectors: np.ndarray
    below: float
    residual: float
    gap: float
    interior: float

    @property
    def count(self) -> int:
        return int(self.energies.size)

    def parked(self, energy: float):
        """(Z, X) with H' = H + Z X Z^H: the deep states moved to ``energy`` eV."""
        Y = self.vectors
        X = (Y * (float(energy) - self.energies)) @ Y.conj().T
        return self.s_basis, X

    def components(self, x):
        """C^H x, (m, k): the components along the Ritz vectors of vectors x given as
        S-dual (covectors, e.g. L r)."""
        return self.vectors.conj().T @ (self.basis.conj().T @ x)

    def mulliken(self, G) -> np.ndarray:
        """(rows of G, m): the Mulliken weight sum_{mu in g} c_mu (S c)_mu of every deep
        state on every row g of the (groups, n) 0/1 matrix ``G``."""
        out = np.zeros((G.shape[0], self.count))
        Q, SQ = sp.csr_array(self.basis), sp.csr_array(self.s_basis)
        step = 256
        for i in range(0, self.count, step):
            Yc = np.ascontiguousarray(self.vectors[:, i : i + step])
            C, SC = _times(Q, Yc), _times(SQ, Yc)
            out[:, i : i + step] = G @ (np.conj(C) * SC).real
        return out


def _diagonal_blocks(indptr, indices, data, atom_of, ptr, out):
    """out[a] = the diagonal block of atom a of the csr matrix (compiled kernel)."""
    for r in range(indptr.size - 1):
        a = atom_of[r]
        lo, hi = ptr[a], ptr[a + 1]
        for p in range(indptr[r], indptr[r + 1]):
            c = indices[p]
            if lo <= c < hi:
                out[a, r - lo, c - lo] = data[p]


def _atom_blocks(M, atom_of, ptr):
    """Dense diagonal atom blocks of the csr matrix M: (n_atoms, nmax, nmax), zero-padded."""
    M = sp.csr_array(M)
    nmax = int(np.diff(ptr).max())
    kernel = compiled(_diagonal_blocks)
    if kernel is not None:
        out = np.zeros((len(ptr) - 1, nmax, nmax), dtype=M.dtype)
        kernel(M.indptr, M.indices, M.data, atom_of, ptr, out)
        return out
    rows = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
    cols = M.indices
    same = atom_of[rows] == atom_of[cols]
    r, c, v = rows[same], cols[same], M.data[same]
    a = atom_of[r]
    nmax = int(np.diff(ptr).max())
    out = np.zeros((len(ptr) - 1, nmax, nmax), dtype=M.dtype)
    out[a, r - ptr[a], c - ptr[a]] = v
    return out


def auto_threshold(levels) -> float | None:
    """The middle of the highest gap of at least :data:`AUTO_GAP` eV between atomic
    levels (all atoms' levels, eV) that lies at least :data:`AUTO_DEPTH` eV below their
    median and has at most :data:`AUTO_FRACTION` of the levels under it, or None when
    there is none: the levels under it are semicore-like, far below the valence states
    (W 5s/5p, Hf 5s/5p and Ni 3p: 12 % of the WSe2/HfO2:Ni device's orbitals)."""
    e = np.sort(np.concatenate([np.ravel(x) for x in levels]))
    if e.size < 2:
        return None
    mid = 0.5 * (e[:-1] + e[1:])
    ok = (
        (np.diff(e) >= AUTO_GAP)
        & (mid <= np.median(e) - AUTO_DEPTH)
        & (np.arange(1, e.size) <= AUTO_FRACTION * e.size)
    )
    wide = np.flatnonzero(ok)
    return None if wide.size == 0 else float(mid[wide[-1]])


def deep_states(
    H,
    S,
    atom_of,
    below: float | str,
    tol: float = 0.1,
    max_atoms: int = 48,
    drop: float = 1e-5,
    threads: int | None = None,
) -> DeepStates | None:
    """The states of H c = E S c below ``below`` eV that come from atomic levels below
    it (module docstring), or None when no atom has such a level.  ``below='auto'``:
    the threshold of :func:`auto_threshold` (None when the atomic levels have no such
    gap).

    H, S: sparse (n, n) Hermitian, S positive definite; atom_of: (n,) the atom of every
    orbital, atoms contiguous and in order.  tol: an atom joins the cluster of a deep
    atom when the residual of that atom's deep levels on its orbitals exceeds ``tol``
    eV (np.inf: the atomic levels alone; 0: every coupled atom); max_atoms: at most
    this many atoms per cluster, the most strongly coupled.  drop: elements of S C
    below ``drop`` times their column's largest are left out of the term that parks the
    deep states (its cost per Chebyshev step; 1e-5 left the levels within 5 eV of E_F of
    a WSe2 cell unchanged to 1e-6 eV and kept 16 % of the elements at 954 atoms).  Raises
    :class:`DeflationError` when the deep levels are not separated from the others (a
    gap of less than 1 eV between the highest deep Ritz value and the lowest atomic level
    above ``below``: the threshold cuts through a band).  threads: the clusters'
    eigenproblems run side by side in this many threads with one BLAS thread each
    (None: the cores this process may use; 0: one after another with BLAS's own threads).
    """
    H, S = sp.csr_array(H), sp.csr_array(S)
    n = H.shape[0]
    atom_of = np.asarray(atom_of)
    if H.shape != S.shape or H.shape[0] != H.shape[1]:
        raise DeflationError(f"H and S must be square and of one shape; got {H.shape}, {S.shape}")
    if atom_of.shape != (n,) or atom_of.dtype.kind not in "iu":
        raise DeflationError(
            f"atom_of must be an integer array of {n} orbital atoms; got {atom_of.shape} "
            f"{atom_of.dtype}"
        )
    if n and (atom_of[0] != 0 or np.any(np.diff(atom_of) < 0) or np.any(np.diff(atom_of) > 1)):
        raise DeflationError("atom_of must number the atoms 0, 1, ... with contiguous orbitals")
    if not 0 <= drop < 1:
        raise DeflationError(f"drop must be in [0, 1); got {drop!r}")
    if not tol >= 0:
        raise DeflationError(f"tol must be >= 0 eV (np.inf: atomic levels alone); got {tol!r}")
    if int(max_atoms) != max_atoms or max_atoms < 1:
        raise DeflationError(f"max_atoms must be an integer >= 1; got {max_atoms!r}")
    if threads is not None and (int(threads) != threads or threads < 0):
        raise DeflationError(f"threads must be None or an integer >= 0; got {threads!r}")
    auto = isinstance(below, str) and below == "auto"
    if not auto:
        try:
            below = float(below)
        except (TypeError, ValueError):
            msg = f"below must be an energy in eV or 'auto'; got {below!r}"
            raise DeflationError(msg) from None
        if not np.isfinite(below):
            raise DeflationError(f"below must be finite; got {below}")
    n_atoms = int(atom_of[-1]) + 1 if n else 0
    ptr = np.searchsorted(atom_of, np.arange(n_atoms + 1))
    sizes = np.diff(ptr)
    Hb, Sb = _atom_blocks(H, atom_of, ptr), _atom_blocks(S, atom_of, ptr)
    dtype = np.result_type(H.dtype, S.dtype, np.float64)
    levels, vecs = [], []
    for a in range(n_atoms):
        k = sizes[a]
        try:
            e, V = scipy.linalg.eigh(Hb[a, :k, :k], Sb[a, :k, :k])
        except np.linalg.LinAlgError as err:
            msg = f"atom {a}: its diagonal block of S is not positive definite"
            raise DeflationError(msg) from err
        levels.append(e)
        vecs.append(V.astype(dtype, copy=False))
    if auto:
        below = auto_threshold(levels)
        if below is None:
            return None
    deep = [np.flatnonzero(e < below) for e in levels]
    m = int(sum(len(d) for d in deep))
    if m == 0:
        return None
    shallow_min = min((e[e >= below].min() for e in levels if np.any(e >= below)), default=np.inf)
    homes = np.flatnonzero([len(d) for d in deep])
    # Q0: the deep atomic levels, column k on its home atom
    home = np.concatenate([np.full(len(deep[a]), a) for a in homes])
    eps = np.concatenate([levels[a][deep[a]] for a in homes])
    rows = np.concatenate([np.tile(np.arange(ptr[a], ptr[a + 1]), len(deep[a])) for a in homes])
    cols = np.repeat(np.arange(m), sizes[home])
    vals = np.concatenate([vecs[a][:, deep[a]].T.ravel() for a in homes])
    Q = sp.csc_array((vals, (rows, cols)), shape=(n, m), dtype=dtype)
    if tol < np.inf:
        n_deep = np.array([len(d) for d in deep])
        Q = _clusters(
            H, S, Q, eps, home, homes, n_deep, atom_of, ptr, below, tol, int(max_atoms), threads
        )
    with ThreadPoolExecutor(2) as pool:  # scipy's sparse products release the GIL
        SQ, HQ = pool.map(lambda M: (M @ Q).tocsc(), (S, H))
    Sq = (Q.conj().T @ SQ).toarray()
    Hq = (Q.conj().T @ HQ).toarray()
    del HQ
    SQ = _drop_small(SQ, drop)
    Sq, Hq = 0.5 * (Sq + Sq.conj().T), 0.5 * (Hq + Hq.conj().T)
    try:
        E, Y = scipy.linalg.eigh(Hq, Sq)
    except np.linalg.LinAlgError as err:
        raise DeflationError(
            f"the {m} localised deep states are linearly dependent ({err}); raise tol"
        ) from None
    # the residual of up to 64 Ritz pairs spread over the deep spectrum (all of them
    # would cost m products with H): ||(H - E S) c|| / ||S c||
    pick = np.unique(np.linspace(0, m - 1, min(m, 64)).round().astype(int))
    Yc = np.ascontiguousarray(Y[:, pick])
    SC = _times(sp.csr_array(SQ), Yc)
    R = _times(H, _times(sp.csr_array(Q), Yc)) - SC * E[pick]
    res = float((np.linalg.norm(R, axis=0) / np.linalg.norm(SC, axis=0)).max())
    gap = float(shallow_min - E.max())
    if not gap > 1.0:
        raise _not_separated(
            below,
            f"the highest deep Ritz value is {E.max():.3f} eV and the lowest atomic level "
            f"above the threshold {shallow_min:.3f} eV",
        )
    interior = float(np.median(np.concatenate([e[e >= below] for e in levels])))
    return DeepStates(Q, SQ, E, Y, below, res, gap, interior)


def _gather(indptr, indices, data, idx, pos, out):
    """out[i, pos[j]] = M[idx[i], j] for the columns j with pos[j] >= 0 (csr M)."""
    for i in range(idx.size):
        r = idx[i]
        for p in range(indptr[r], indptr[r + 1]):
            j = pos[indices[p]]
            if j >= 0:
                out[i, j] = data[p]


def _submatrix(M, idx, pos):
    """Dense M[idx][:, idx] of the csr M; ``pos``: -1 of length n, restored on return."""
    pos[idx] = np.arange(idx.size)
    kernel = compiled(_gather)
    if kernel is None:
        out = M[idx][:, idx].toarray()
    else:
        out = np.zeros((idx.size, idx.size), dtype=M.dtype)
        kernel(M.indptr, M.indices, M.data, idx, pos, out)
    pos[idx] = -1
    return out


def _drop_small(Z, rel: float):
    """csc Z without the elements below ``rel`` times their column's largest magnitude."""
    if rel <= 0 or Z.nnz == 0:
        return Z
    Z = sp.csc_array(Z)
    counts = np.diff(Z.indptr)
    mx = np.zeros(Z.shape[1])
    nz = counts > 0
    mx[nz] = np.maximum.reduceat(np.abs(Z.data), Z.indptr[:-1][nz])
    keep = np.abs(Z.data) >= rel * np.repeat(mx, counts)
    col = np.repeat(np.arange(Z.shape[1]), counts)[keep]
    return sp.csc_array((Z.data[keep], (Z.indices[keep], col)), shape=Z.shape)


def _not_separated(below, detail):
    return DeflationError(
        f"the deep levels below {below} eV are not separated from the others: {detail}; "
        f"choose a threshold in a wide gap of the atomic levels"
    )


def _clusters(H, S, Q, eps, home, homes, n_deep, atom_of, ptr, below, tol, max_atoms, threads):
    """Each deep atom's levels projected on the deep invariant subspace of its cluster:
    the atom and the atoms on which the residual (H - e S) q of its levels exceeds tol.
    (Shifted inverse iterations instead of the cluster's eigenvectors were tried: they
    weight the neighbours' deep states, truncated at the cluster's edge, unevenly, and
    left errors 40x larger in a test system.)"""
    n_atoms = len(ptr) - 1
    R = (H @ Q - (S @ Q) @ sp.diags_array(eps)).tocsr()
    R2 = sp.csr_array(((np.abs(R.data) ** 2), R.indices, R.indptr), shape=R.shape)
    to_atom = sp.csr_array(
        (np.ones(len(atom_of)), (atom_of, np.arange(len(atom_of)))), shape=(n_atoms, len(atom_of))
    )
    to_home = sp.csr_array(
        (np.ones(len(home)), (np.arange(len(home)), np.searchsorted(homes, home))),
        shape=(len(home), len(homes)),
    )
    strength = (to_atom @ R2 @ to_home).tocsc()  # (atoms, deep atoms): squared norms
    col0 = np.searchsorted(home, homes)  # first column of each deep atom
    Qr = Q.tocsr()
    n_cols = np.bincount(np.searchsorted(homes, home), minlength=len(homes))
    scratch = threading.local()  # per thread: -1 of length n, for _submatrix

    def project(i):
        a = homes[i]
        lo, hi = strength.indptr[i], strength.indptr[i + 1]
        b, w = strength.indices[lo:hi], strength.data[lo:hi]
        sel = (w > tol**2) & (b != a)
        b, w = b[sel], w[sel]
        if b.size > max_atoms - 1:
            b = b[np.argsort(w)[::-1][: max_atoms - 1]]
        atoms = np.sort(np.append(b, a))
        idx = np.concatenate([np.arange(ptr[x], ptr[x + 1]) for x in atoms])
        kcols = np.arange(col0[i], col0[i] + n_cols[i])
        q = Qr[idx][:, kcols].toarray()
        if atoms.size > 1:
            if not hasattr(scratch, "pos"):
                scratch.pos = np.full(H.shape[0], -1, dtype=np.int64)
            Hc, Sc = _submatrix(H, idx, scratch.pos), _submatrix(S, idx, scratch.pos)
            Hc, Sc = 0.5 * (Hc + Hc.conj().T), 0.5 * (Sc + Sc.conj().T)
            k = int(n_deep[atoms].sum())  # the cluster's lowest k + 1 states
            ev, D = scipy.linalg.eigh(Hc, Sc, subset_by_index=(0, min(k, idx.size - 1)))
            if ev[k - 1] >= below or (ev.size > k and ev[k] < below):
                raise _not_separated(
                    below,
                    f"the cluster of atom {a} ({atoms.size} atoms) has "
                    f"{int((ev < below).sum())}{'+' if ev[-1] < below else ''} states "
                    f"below it and its atoms {k} atomic levels",
                )
            D = D[:, :k]
            q = D @ (D.conj().T @ (Sc @ q))  # onto the cluster's deep subspace
        return np.repeat(idx, kcols.size), np.tile(kcols, idx.size), q.ravel()

    # the clusters' eigenproblems (a few hundred orbitals each) side by side, one BLAS
    # thread each: threaded BLAS on matrices this small is mostly overhead
    if threads == 0:
        parts = [project(i) for i in range(len(homes))]
    else:
        with single_threaded_blas(), ThreadPoolExecutor(threads or usable_cores()) as pool:
            parts = list(pool.map(project, range(len(homes))))
    out_rows, out_cols, out_vals = zip(*parts)
    return sp.csc_array(
        (np.concatenate(out_vals), (np.concatenate(out_rows), np.concatenate(out_cols))),
        shape=Q.shape,
        dtype=Q.dtype,
    )
