"""KPM against an exact reference at device scale: a GPAW cell's H(R) tiled into a supercell.

    python benchmarks/kpm_supercell.py DATASET [--index 1] [--repeat 3] [--random 16 64]
                                       [--resolution 0.1] [--window 0.2] [--total-too]
                                       [--deep-below auto] [--screen 1e-8] [--seed 0]
                                       [--subsets 8] [--timing-moments 64]
                                       [--precision auto|double|single]

A k-sampled extraction gives the real-space H(R) and S(R) of a cell (here a 6x6 WSe2
cell with Se vacancies from ``make_wse2.py``).  Tiled ``--repeat`` x ``--repeat`` in
the plane (:meth:`BlockMatrices.supercell`), they give the DFT H and S of a
supercell of up to ~4000 atoms at Gamma, whose eigenvalues are exactly those of the
cell at the folded k-points: the dense reference (eigenvalues, species-projected
Mulliken weights) costs only repeat^2 small diagonalisations.  KPM runs on the
supercell's sparse matrices as the calculator runs it (one Cholesky factor, Lanczos
bounds, Jackson kernel at ``--resolution``) for each number of random vectors, with
species projections (one moment per step) and, with ``--total-too``, for the total
alone (two moments per step; in this all-W/Se cell the W+Se count is the total).

Printed: the stages' times and peak RSS; E_F (KPM: integrated DOS; exact: in the gap);
the L1 error of the DOS; and the W+Se states in the ``--window`` eV below the valence-
band maximum (the paper's hole window for a Fermi level pinned that far inside the
valence band): exact (sharp), exact with the same Jackson kernel (the broadening
part of the error) and KPM (adds the stochastic part), with KPM's relative error
against the kernel-broadened exact count, and the count integrated from the moments with
its stochastic standard error (``kpm_window_count``) and how many errors it is off.
``--precision``: of the triangular solves (default 'auto', as the calculator: single
precision from 20,000 orbitals; the same seed in both precisions gives the same random
vectors, so two runs differ by the precision alone).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from dataclasses import replace

import numpy as np
import scipy.linalg as la


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def folded_reference(s, r: int):
    """Exact spectrum of the cell ``s`` tiled r x r in the plane: the eigenvalues of the
    cell at the r^2 folded k-points, sorted, with their Mulliken weights per species
    (rows in the order of ``species``).  Returns (E, W, species)."""
    Hb, Sb = s.blocks("H"), s.blocks("S")
    sym = np.repeat(np.array(s.atoms.get_chemical_symbols()), s.orbital_counts)
    species = list(dict.fromkeys(sym))
    E, W = [], []
    for m1, m2 in itertools.product(range(r), range(r)):
        k = [m1 / r, m2 / r, 0.0]
        Sk = Sb.matrix(k, sparse=False)
        e, C = la.eigh(Hb.matrix(k, sparse=False), Sk)
        w = (np.conj(C) * (Sk @ C)).real
        E.append(e)
        W.append(np.stack([w[sym == x].sum(0) for x in species]))
    E, W = np.concatenate(E), np.concatenate(W, axis=1)
    order = np.argsort(E)
    return E[order], W[:, order], species


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--index", type=int, default=1, help="structure of the dataset")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--random", type=int, nargs="+", default=[16, 64])
    p.add_argument("--resolution", type=float, default=0.1, help="eV (Jackson kernel)")
    p.add_argument("--window", type=float, default=0.2, help="eV below the VBM")
    p.add_argument(
        "--timing-moments",
        type=int,
        help="only time this many moments and extrapolate to the resolution (no accuracy)",
    )
    p.add_argument(
        "--deep-below",
        help="eV or 'auto': take the states of atomic levels below this out of the "
        "Chebyshev interval (ase_gearsh.electronic.deflation; here both put W 5s and 5p "
        "out)",
    )
    p.add_argument("--seed", type=int, default=0, help="of the random vectors")
    p.add_argument(
        "--screen",
        type=float,
        default=0.0,
        help="drop the elements of S below this (the calculator's overlap_screen, default "
        "there 1e-8) and the stored zeros of H and S; 0: S and H as tiled",
    )
    p.add_argument(
        "--subsets",
        type=int,
        help="also report E_F, the DOS error and the W+Se window from each disjoint "
        "subset of this many of the run's random vectors (independent smaller runs "
        "at no extra cost)",
    )
    p.add_argument(
        "--precision",
        choices=("double", "single", "auto"),
        default="auto",
        help="of the triangular solves (CholeskyFactor; 'auto', as the calculator: single "
        "from 20,000 orbitals)",
    )
    p.add_argument(
        "--total-too",
        action="store_true",
        help="also run the total moments alone (DOS and E_F: two moments per step) per R",
    )
    a = p.parse_args(argv)
    from ase_gearsh.core.data import Dataset
    from ase_gearsh.electronic.deflation import deep_states
    from ase_gearsh.electronic.kpm import (
        CholeskyFactor,
        chebyshev_moments,
        kpm_density,
        kpm_fermi_level,
        kpm_n_moments,
        kpm_window_count,
        moments_from_eigen,
        spectral_bounds,
    )

    s = Dataset(a.dataset)[a.index]
    r = a.repeat
    Hb, Sb = s.blocks("H"), s.blocks("S")
    sym = np.repeat(np.array(s.atoms.get_chemical_symbols()), s.orbital_counts)
    n_cells = r * r
    print(
        f"cell {s.atoms.get_chemical_formula()} ({Hb.n_orbitals} orbitals), repeated "
        f"{r}x{r}: {n_cells * len(s.atoms)} atoms, {n_cells * Hb.n_orbitals} orbitals",
        flush=True,
    )
    # exact reference: the cell at the folded k-points
    t = time.perf_counter()
    E, W, species = folded_reference(s, r)
    n_occ = int(round(s.n_electrons * n_cells / 2))
    vbm, cbm = E[n_occ - 1], E[n_occ]
    t_ref = time.perf_counter() - t
    print(
        f"exact reference ({n_cells} k-points of the cell): {t_ref:.1f} s; spectrum "
        f"{E[0]:.2f} .. {E[-1]:.2f} eV, VBM {vbm:.3f}, CBM {cbm:.3f} eV",
        flush=True,
    )
    t0 = t = time.perf_counter()
    H, S = Hb.supercell((r, r, 1)).matrix(), Sb.supercell((r, r, 1)).matrix()
    if a.screen > 0:
        for M_ in (H, S):
            M_.eliminate_zeros()
        S.data[np.abs(S.data) < a.screen] = 0.0
        S.eliminate_zeros()
    print(
        f"supercell H and S (nnz {H.nnz:,}, {S.nnz:,}; S screened at {a.screen:g}) in "
        f"{time.perf_counter() - t:.1f} s",
        flush=True,
    )
    t = time.perf_counter()
    factor = CholeskyFactor(S, precision=a.precision)
    t_chol = time.perf_counter() - t
    deep = None
    if a.deep_below is not None:
        t = time.perf_counter()
        atom_of = np.repeat(np.arange(n_cells * len(s.atoms)), np.tile(s.orbital_counts, n_cells))
        below = a.deep_below if a.deep_below == "auto" else float(a.deep_below)
        deep = deep_states(H, S, atom_of, below)
        n_deep = int((E < deep.below).sum())
        print(
            f"deep states below {deep.below:.2f} eV: {deep.count} (exact: {n_deep}) in "
            f"{time.perf_counter() - t:.1f} s; Ritz residual {deep.residual:.2e} eV, gap "
            f"{deep.gap:.1f} eV, max |E_deep - exact| "
            f"{np.abs(deep.energies - E[: deep.count]).max():.2e} eV; "
            f"S C: {deep.s_basis.nnz:,} non-zeros",
            flush=True,
        )
    t = time.perf_counter()
    bounds = spectral_bounds(H, S, factor=factor, deep=deep)
    t_bounds = time.perf_counter() - t
    M = kpm_n_moments(bounds, a.resolution)
    print(
        f"Cholesky of S ({factor.precision} solves) {t_chol:.1f} s; bounds "
        f"{bounds[0]:.2f} .. {bounds[1]:.2f} eV in "
        f"{t_bounds:.1f} s; {M} moments for {a.resolution} eV; RSS {rss_gib():.2f} GiB",
        flush=True,
    )
    sym_sc = np.tile(sym, n_cells)
    groups = {x: np.flatnonzero(sym_sc == x) for x in species}
    # (R, projected): species projections (one moment per step), or the total alone
    modes = (True, False) if a.total_too else (True,)
    if a.timing_moments:
        for R, projected in itertools.product(a.random, modes):
            t = time.perf_counter()
            chebyshev_moments(
                H,
                S,
                a.timing_moments,
                R,
                groups if projected else None,
                bounds=bounds,
                block=R,
                factor=factor,
                deep=deep,
            )
            dt = time.perf_counter() - t
            print(
                f"R {R}{'' if projected else ' (total alone)'}: {a.timing_moments} "
                f"moments in {dt:.1f} s ({dt / a.timing_moments:.3f} s per moment): {M} "
                f"moments would take {dt * M / a.timing_moments / 60:.1f} min; "
                f"peak RSS {rss_gib():.2f} GiB",
                flush=True,
            )
        return
    lo, hi = vbm - a.window, vbm
    grid = np.linspace(bounds[0], bounds[1], 40001)
    win = np.linspace(lo, hi, 401)

    def count(dos, which=species):
        return float(2.0 * np.trapezoid(sum(np.interp(win, grid, dos[x]) for x in which), win))

    def summary(mom, projected):
        """E_F, the L1 error of the DOS, the W+Se window count on the grid, and the same
        count integrated exactly from the moments with its standard error."""
        dk = kpm_density(mom, grid)
        ef = kpm_fermi_level(mom, s.n_electrons * n_cells)
        l1 = np.trapezoid(np.abs(dk["total"] - dex["total"]), grid) / mom.n_orbitals
        c = count(dk, species if projected else ["total"])  # the cell is all W and Se
        cw, err = kpm_window_count(mom, lo, hi, species if projected else "total")
        return ef, l1, c, cw, err

    sharp = 2.0 * int(((E >= lo) & (E <= hi)).sum())
    ex = None
    print(
        f"{'R':>4s} {'time s':>8s} {'E_F':>8s} {'L1 DOS':>7s} {'W+Se window':>12s} "
        f"{'exact (kernel)':>15s} {'error':>7s}"
    )
    for R, projected in itertools.product(a.random, modes):
        t = time.perf_counter()
        mom = chebyshev_moments(
            H,
            S,
            M,
            R,
            groups if projected else None,
            bounds=bounds,
            seed=a.seed,
            block=R,
            progress=True,
            factor=factor,
            deep=deep,
        )
        dt = time.perf_counter() - t
        if ex is None:  # the exact moments with the same kernel and scaling
            weights = np.vstack([np.ones_like(E), W])
            k = 0 if deep is None else deep.count  # deep states: exact, as Gaussians
            ex = mom.__class__(
                moments_from_eigen(E[k:], weights[:, k:], mom.center, mom.half_width, M),
                mom.names,
                mom.center,
                mom.half_width,
                0,
                mom.n_orbitals,
                None,
                None if deep is None else E[:k],
                None if deep is None else weights[:, :k],
            )
            dex = kpm_density(ex, grid)
            ref_count = count(dex)
        ef, l1, c, cw, err = summary(mom, projected)
        print(
            f"{R:4d} {dt:8.1f} {ef:8.3f} {100 * l1:6.2f}% {c:12.2f} {ref_count:15.2f} "
            f"{100 * (c - ref_count) / ref_count:+6.1f}%"
            + ("" if projected else "  (total alone, two moments per step)"),
            flush=True,
        )
        print(
            f"      from the moments: {2 * cw:.2f} +- {2 * err:.2f} (standard error), "
            f"{(c - ref_count) / (2 * err):+.1f} errors from the exact count with the kernel",
            flush=True,
        )
        if a.subsets and R >= 2 * a.subsets and mom.per_vector is not None:
            for i0 in range(0, R - a.subsets + 1, a.subsets):
                pv = mom.per_vector[:, i0 : i0 + a.subsets]
                sub = replace(mom, moments=pv.mean(axis=1), per_vector=pv, n_random=len(pv[0]))
                efs, l1s, cs, cws, errs = summary(sub, projected)
                print(
                    f"      vectors {i0}-{i0 + a.subsets - 1}: E_F {efs:.3f}, L1 DOS "
                    f"{100 * l1s:.2f}%, window {cs:.2f} ({100 * (cs - ref_count) / ref_count:+.1f}"
                    f"%), from the moments {2 * cws:.2f} +- {2 * errs:.2f}",
                    flush=True,
                )
        if not projected:
            continue
        print(  # a single species: the Mulliken group estimator, not the total's
            "      per species (KPM +- standard error / exact with the kernel): "
            + ", ".join(
                f"{x} {2 * c:.2f} +- {2 * e:.2f} / {count(dex, [x]):.2f}"
                for x in species
                for c, e in [kpm_window_count(mom, lo, hi, x)]
            ),
            flush=True,
        )
    print(
        f"sharp exact count (both spins) in [VBM - {a.window}, VBM]: {sharp:.0f}; exact E_F "
        f"in the gap ({vbm:.3f}, {cbm:.3f}); total without the exact reference "
        f"{time.perf_counter() - t0:.1f} s; peak RSS {rss_gib():.2f} GiB"
    )


if __name__ == "__main__":
    main()
