"""Exact states near the Fermi level at device scale, against an exact reference.

    python benchmarks/window_supercell.py DATASET [--index 1] [--repeat 3 6] [--window 0.2]
                                          [--k 48] [--block 32]
                                          [--route auto|reuse|centre|edge|both|all]
                                          [--release] [--tol 1e-4]

The DFT H(R) and S(R) of a k-sampled cell (a 6x6 WSe2 cell with Se vacancies from
``make_wse2.py``) tiled ``--repeat`` x ``--repeat`` in the plane give the H and S of a
supercell at Gamma whose spectrum is exactly the cell's at the folded k-points
(``kpm_supercell.folded_reference``).  On the supercell's sparse matrices, as the
calculator runs them (:mod:`ase_gearsh.electronic.window`):

* the Fermi level: sparse LDL^T factorisations of H - sigma S count the states below
  sigma exactly, shift-invert iterations give the states around it (E_F mid-gap); the
  first shift is the local-cluster estimate (``local_guess``; ``--diagonal-guess``: the
  diagonal fill, ``--guess``: a given value);
* the paper's hole window: every state in the ``--window`` eV below the valence-band
  maximum (for a Fermi level pinned that far inside the valence band), with its W and Se
  Mulliken weights; ``--route``: ``auto`` as the calculator does (given the Fermi
  level's HOMO and LUMO: a new factorisation just beyond the band edge when the window
  ends in the gap, else at the window's centre unless the Fermi level's shift lies
  within 1 eV of the window), ``reuse`` (the Fermi level's factorisation), ``centre`` (a new one),
  ``edge`` (a new one in the gap just above the valence-band maximum, from the Fermi
  level's HOMO and LUMO: ``window.edge_shift``), ``both``
  (reuse, then centre, back to back) or ``all`` (reuse, edge, centre).

Printed per size: stage times, peak RSS, E_F, HOMO/LUMO and the window's states and W/Se
weights against the reference (largest eigenvalue and weight errors).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kpm_supercell import folded_reference  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--index", type=int, default=1, help="structure of the dataset")
    p.add_argument("--repeat", type=int, nargs="+", default=[3, 6])
    p.add_argument("--window", type=float, default=0.2, help="eV below the VBM")
    p.add_argument("--k", type=int, default=48, help="states asked for near E_F")
    p.add_argument("--block", type=int, default=32, help="vectors per solve")
    p.add_argument("--guess", type=float, help="first shift for E_F (default: local clusters)")
    p.add_argument(
        "--diagonal-guess", action="store_true", help="first shift from the diagonal fill"
    )
    p.add_argument(
        "--route",
        choices=["auto", "reuse", "centre", "edge", "both", "all"],
        default="auto",
        help="the window's factorisation (see above)",
    )
    p.add_argument(
        "--release",
        action="store_true",
        help="free the Fermi level's factorisation when the window makes its own "
        "(peak memory of one factorisation; the calculator's keep_factor=False)",
    )
    p.add_argument(
        "--tol",
        type=float,
        help="residual tolerance of the states (eV; default: the library's, 1e-4)",
    )
    a = p.parse_args(argv)
    tol = {} if a.tol is None else {"tol": a.tol}
    from ase_gearsh.core.data import Dataset
    from ase_gearsh.electronic.window import (
        WindowError,
        edge_shift,
        fermi_states,
        local_guess,
        window_states,
    )

    s = Dataset(a.dataset)[a.index]
    Hb, Sb = s.blocks("H"), s.blocks("S")
    for r in a.repeat:
        n_cells = r * r
        print(
            f"\n== cell {s.atoms.get_chemical_formula()} ({Hb.n_orbitals} orbitals) repeated "
            f"{r}x{r}: {n_cells * len(s.atoms)} atoms, {n_cells * Hb.n_orbitals} orbitals",
            flush=True,
        )
        t = time.perf_counter()
        E, W, species = folded_reference(s, r)
        n_el = s.n_electrons * n_cells
        n_occ = int(round(n_el / 2))
        vbm, cbm = E[n_occ - 1], E[n_occ]
        print(
            f"exact reference ({n_cells} k-points of the cell): {time.perf_counter() - t:.1f} s;"
            f" VBM {vbm:.4f}, CBM {cbm:.4f} eV",
            flush=True,
        )
        t = time.perf_counter()
        H, S = Hb.supercell((r, r, 1)).matrix(), Sb.supercell((r, r, 1)).matrix()
        H, S = H.real.tocsr(), S.real.tocsr()
        print(
            f"supercell H and S (nnz {H.nnz:,}, {S.nnz:,}) in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        t0 = time.perf_counter()
        counts = np.tile(s.orbital_counts, n_cells)
        atom_of = np.repeat(np.arange(len(counts)), counts)
        guess = a.guess
        if guess is None and not a.diagonal_guess:
            guess = local_guess(H, S, n_el, atom_of)
            print(
                f"local-cluster guess {guess:.4f} eV in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        fs = fermi_states(H, S, n_el, k=a.k, block=a.block, guess=guess, **tol)
        t_f = time.perf_counter() - t0
        tried = ", ".join(f"{x:.3f} eV ({c} below)" for x, c in fs.factorisations)
        print(
            f"Fermi level {fs.fermi_level:.4f} eV (reference mid-gap {0.5 * (vbm + cbm):.4f}); "
            f"HOMO {fs.homo:.6f} (error {abs(fs.homo - vbm):.1e}), LUMO {fs.lumo:.6f} (error "
            f"{abs(fs.lumo - cbm):.1e}) in {t_f:.1f} s: {len(fs.factorisations)} "
            f"factorisation(s) at {tried}; last iteration {fs.states.seconds['iteration']:.1f}"
            f" s, {fs.states.solves} solves; RSS {rss_gib():.2f} GiB",
            flush=True,
        )
        lo, hi = vbm - a.window, vbm + 1e-4
        sym = np.tile(
            np.repeat(np.array(s.atoms.get_chemical_symbols()), s.orbital_counts), n_cells
        )
        sel = (E >= lo) & (E <= hi)
        routes = {
            "auto": [None],
            "reuse": [False],
            "centre": [True],
            "edge": ["edge"],
            "both": [False, True],
            "all": [False, "edge", True],
        }
        t_w = 0.0
        for refactor in routes[a.route]:
            t = time.perf_counter()
            opts = dict(factor=fs.factor, k=a.k, block=a.block, release=a.release, **tol)
            if refactor is None:  # as the calculator: it knows the gap from E_F
                opts["gap"] = (fs.homo, fs.lumo)
            elif refactor == "edge":
                opts["sigma"] = edge_shift(lo, hi, fs.homo, fs.lumo)
            else:
                opts["refactor"] = refactor
            try:
                w = window_states(H, S, lo, hi, **opts)
            except WindowError as err:
                print(f"window: {err} (after {time.perf_counter() - t:.1f} s)", flush=True)
                continue
            t_w = time.perf_counter() - t
            wt = w.weights(S, {x: np.flatnonzero(sym == x) for x in species})
            ok = len(w.eigenvalues) == sel.sum()
            e_err = np.abs(w.eigenvalues - E[sel]).max() if ok else float("nan")
            counts = ", ".join(
                f"{x} {2 * wt[x].sum():.4f} (exact {2 * W[i, sel].sum():.4f})"
                for i, x in enumerate(species)
            )
            how = (
                f"new factorisation at {w.sigma:.3f} eV: {w.seconds['factorisation']:.1f} s"
                if "factorisation" in w.seconds
                else f"the Fermi level's factorisation at {w.sigma:.3f} eV"
            )
            print(
                f"window [VBM - {a.window:g}, VBM] eV: {len(w.eigenvalues)} states (exact "
                f"{sel.sum()}), largest eigenvalue error {e_err:.1e} eV; states x 2 spins: "
                f"{counts}; in {t_w:.1f} s ({how}; {w.solves} solves); "
                f"RSS {rss_gib():.2f} GiB",
                flush=True,
            )
        print(
            f"total for E_F and the window: {t_f + t_w:.1f} s on {len(s.atoms) * n_cells} "
            f"atoms; peak RSS {rss_gib():.2f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
