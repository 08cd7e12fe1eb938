"""Three ways to shorten device-scale KPM that were measured and not adopted.

    python benchmarks/kpm_leads.py top-band PIECE_DIR        [--above 43] [--tol 0.1]
    python benchmarks/kpm_leads.py group-vectors PIECE_DIR   [--vectors 4000]
    python benchmarks/kpm_leads.py pruned-factor DATASET     [--repeat 3] [--drop 1e-8 1e-6 1e-5]

PIECE_DIR holds ``piece.gpw`` from ``device_piece.py`` (GPAW's H and S of a 120-atom
piece of the device at Gamma); DATASET a k-sampled WSe2 cell from ``make_wse2.py``.

``top-band``: the deep-state machinery (``deflation.deep_states``) on -H finds the states
above ``--above`` eV (the O d polarisation band at the top of the spectrum): how many
against the exact count, the error of their Ritz values, and how far the other levels
move when they are parked (against dense eigenvalues).

``group-vectors``: the variance per random vector of two unbiased estimators of the
W+Se states in a window, with f(A) exact (dense): the present one, (L r)^H P_g f(A)
L^-H r with Rademacher r on every orbital, and r_g^H f(A) r_g with r_g on the group's
orbitals alone.  f: a 0.1 eV Gaussian-smoothed window.

``pruned-factor``: CHOLMOD's factor of a tiled cell's S with the elements below
``--drop`` of their column's diagonal left out, applied by a compiled column-oriented
triangular solve (32 vectors): its non-zeros, its time against CHOLMOD's supernodal
solve with the whole factor, and the relative error of the solution.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def top_band(piece: Path, above: float, tol: float):
    from device_piece import gamma_matrices

    from ase_gearsh.electronic.deflation import DeflationError, deep_states

    Hd, Sd, counts, sym, nel = gamma_matrices(piece, 120)
    atom_of = np.repeat(np.arange(len(counts)), counts)
    E = la.eigh(Hd, Sd, eigvals_only=True)
    n_occ = int(round(nel / 2))
    ef = 0.5 * (E[n_occ - 1] + E[n_occ])
    try:
        d = deep_states(sp.csr_array(-Hd), sp.csr_array(Sd), atom_of, -above, tol=tol)
    except DeflationError as err:
        print(f"refused: {err}")
        return
    m = d.count
    top = np.sort(-d.energies)
    park = E[-m - 1] + 0.6  # just above the others, as KPM would park them
    Z = d.s_basis.toarray() @ d.vectors
    Ep = np.sort(la.eigh(Hd + (Z * (park + d.energies)) @ Z.T, Sd, eigvals_only=True))
    err = np.abs(Ep[:-m] - E[:-m])
    near = np.abs(E[:-m] - ef) < 5.0
    print(
        f"states above {above} eV: {m} found, {int((E > above).sum())} exact; Ritz values off "
        f"by up to {np.abs(top - E[-m:]).max():.2e} eV; the other levels with them parked: "
        f"max error {err.max():.2e} eV, within 5 eV of E_F {err[near].max():.2e} eV; width "
        f"without them {E[-m - 1] - E[0]:.1f} eV (with them {E[-1] - E[0]:.1f})"
    )


def group_vectors(piece: Path, n_vec: int):
    from device_piece import gamma_matrices
    from scipy.special import erf

    Hd, Sd, counts, sym, nel = gamma_matrices(piece, 120)
    g = np.isin(np.repeat(np.array(sym), counts), ["W", "Se"])
    n = len(g)
    E, C = la.eigh(Hd, Sd)
    n_occ = int(round(nel / 2))
    ef = 0.5 * (E[n_occ - 1] + E[n_occ])
    L = la.cholesky(Sd, lower=True)
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=(n, n_vec)) * 2.0 - 1.0
    Lr, LmHr, rg = L @ r, la.solve_triangular(L.T, r, lower=False), r * g[:, None]
    print(f"W+Se: {g.sum()} of {n} orbitals; {n_vec} vectors")
    for lo, hi in ((ef, ef + 0.2), (ef - 1.0, ef), (ef - 5.0, ef + 5.0)):
        s = 0.1
        f = 0.5 * (erf((hi - E) / (np.sqrt(2) * s)) - erf((lo - E) / (np.sqrt(2) * s)))
        FA = (C * f) @ C.T @ Sd  # f(A), A = S^-1 H
        exact = np.trace(FA[np.ix_(g, g)])
        now = np.einsum("ik,ik->k", Lr[g], (FA @ LmHr)[g])
        own = np.einsum("ik,ik->k", rg, FA @ rg)
        print(
            f"[E_F {lo - ef:+.1f}, E_F {hi - ef:+.1f}] eV: exact {exact:.3f}; present "
            f"estimator {now.mean():.3f}, sd per vector {now.std():.3f}; group's own vectors "
            f"{own.mean():.3f}, sd {own.std():.3f}; variance ratio {now.var() / own.var():.2f}"
        )


def pruned_factor(dataset: str, repeat: int, drops):
    import numba
    from sksparse import cholmod

    from ase_gearsh.core.data import Dataset

    @numba.njit(parallel=True)
    def l_solve(indptr, indices, data, b, nchunk):  # L x = b, L csc lower, diagonal first
        n, k = b.shape
        x = b.copy()
        step = (k + nchunk - 1) // nchunk
        for t in numba.prange(nchunk):
            c0, c1 = t * step, min(k, (t + 1) * step)
            for j in range(n):
                p0 = indptr[j]
                for c in range(c0, c1):
                    x[j, c] /= data[p0]
                for p in range(p0 + 1, indptr[j + 1]):
                    i, v = indices[p], data[p]
                    for c in range(c0, c1):
                        x[i, c] -= v * x[j, c]
        return x

    s = Dataset(dataset)[1]
    S = s.blocks("S").supercell((repeat, repeat, 1)).matrix()
    f = cholmod.cholesky(sp.csc_matrix(S), mode="supernodal")
    L = f.L().tocsc()
    L.sort_indices()
    n = S.shape[0]
    b = np.random.default_rng(0).standard_normal((n, 32))
    t = time.perf_counter()
    ref = f.solve_L(f.apply_P(b), use_LDLt_decomposition=False)
    t_ref = time.perf_counter() - t
    bp = np.ascontiguousarray(b[f.P()])
    col = np.repeat(np.arange(n), np.diff(L.indptr))
    rel = np.abs(L.data) / np.abs(L.diagonal())[col]
    print(f"{n} orbitals: factor {L.nnz:,} non-zeros; CHOLMOD L^-1 of 32 vectors {t_ref:.3f} s")
    l_solve(L.indptr, L.indices, L.data, bp[:, :2], 2)  # compile
    for drop in drops:
        keep = rel >= drop
        cnt = np.add.reduceat(keep.astype(np.int64), L.indptr[:-1])
        Lp = sp.csc_matrix(
            (L.data[keep], L.indices[keep], np.concatenate([[0], np.cumsum(cnt)])), shape=L.shape
        )
        t = time.perf_counter()
        x = l_solve(Lp.indptr, Lp.indices, Lp.data, bp, 2)
        dt = time.perf_counter() - t
        print(
            f"drop {drop:g}: {Lp.nnz / L.nnz:.2f} of the factor kept, compiled solve {dt:.3f} s, "
            f"relative error {np.abs(x - ref).max() / np.abs(ref).max():.1e}"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("top-band")
    t.add_argument("piece", type=Path)
    t.add_argument("--above", type=float, default=43.0)
    t.add_argument("--tol", type=float, default=0.1)
    g = sub.add_parser("group-vectors")
    g.add_argument("piece", type=Path)
    g.add_argument("--vectors", type=int, default=4000)
    f = sub.add_parser("pruned-factor")
    f.add_argument("dataset")
    f.add_argument("--repeat", type=int, default=3)
    f.add_argument("--drop", type=float, nargs="+", default=[1e-8, 1e-6, 1e-5])
    a = p.parse_args(argv)
    if a.what == "top-band":
        top_band(a.piece, a.above, a.tol)
    elif a.what == "group-vectors":
        group_vectors(a.piece, a.vectors)
    else:
        pruned_factor(a.dataset, a.repeat, a.drop)


if __name__ == "__main__":
    main()
