"""Triangular solves with the Cholesky factor of the device's S: CHOLMOD (double) against
the supernodal panels of ``ase_gearsh.electronic.supernodal`` in double and single precision.

    python benchmarks/supernodal_solve.py [--atoms 3999] [--screen 1e-8] [--vectors 32]
                                          [--repeat 3] [--width 1024]

The device structure (``device_structure.py``) and its exact S (PBE, szp(dzp), screened
as the calculator's ``overlap_screen``); CHOLMOD's supernodal factor L; then, for a block
of random vectors, L^-1 X and L^-T X by CHOLMOD and by :class:`SupernodalFactor` built
from CHOLMOD's L (float64 and float32).  Prints the factor's size, the supernodes, the
time to build the panels, each solve's time (every repeat) and its largest error
relative to CHOLMOD's result, and how far the rounded factor F distorts S:
||F^-1 S F^-T - I||_2 by power iteration (the eigenvalues of H c = E S c move by up to that
fraction of their size).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_structure import build_device  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=3999)
    p.add_argument("--screen", type=float, default=1e-8)
    p.add_argument("--vectors", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--width", type=int, default=1024, help="columns per supernode at most")
    p.add_argument("--power", type=int, default=30, help="power iterations for the distortion")
    a = p.parse_args(argv)
    import scipy.sparse as sp
    from sksparse import cholmod

    from ase_gearsh.electronic.supernodal import SupernodalFactor
    from gpaw_tools.overlap import OverlapCalculator, species_from_gpaw

    atoms = build_device(a.atoms, seed=0)
    sym = atoms.get_chemical_symbols()
    species = species_from_gpaw(sorted(set(sym)), "PBE", "szp(dzp)")
    S = OverlapCalculator(species, screen=a.screen).overlap(atoms)
    n = S.shape[0]
    t = time.perf_counter()
    f = cholmod.cholesky(sp.csc_matrix(S), mode="supernodal")
    t_chol = time.perf_counter() - t
    t = time.perf_counter()
    L = f.L()
    t_l = time.perf_counter() - t
    print(
        f"{len(atoms)} atoms, {n} orbitals, S nnz {S.nnz:,}; CHOLMOD factor in {t_chol:.1f} s, "
        f"L nnz {L.nnz:,} ({100 * L.nnz / (n * (n + 1) / 2):.0f} % of a triangle), copied out "
        f"in {t_l:.1f} s; RSS {rss_gib():.2f} GiB",
        flush=True,
    )
    X = np.random.default_rng(0).standard_normal((n, a.vectors))
    ref = {
        "L^-1": lambda: f.solve_L(X, use_LDLt_decomposition=False),
        "L^-T": lambda: f.solve_Lt(X, use_LDLt_decomposition=False),
    }
    exact = {}
    for name, fn in ref.items():
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            exact[name] = fn()
            times.append(time.perf_counter() - t)
        print(
            f"CHOLMOD (double) {name} of {a.vectors} vectors: "
            + ", ".join(f"{x:.3f}" for x in times)
            + " s",
            flush=True,
        )
    for dtype in (np.float64, np.float32):
        t = time.perf_counter()
        F = SupernodalFactor(L, dtype, width=a.width)
        t_build = time.perf_counter() - t
        print(
            f"panels in {np.dtype(dtype).name}: {F.n_supernodes} supernodes, "
            f"{F.nbytes / 2**30:.2f} GiB, built in {t_build:.1f} s; RSS {rss_gib():.2f} GiB",
            flush=True,
        )
        F.forward(X[:, :2])  # compile
        F.backward(X[:, :2])
        for name, fn in (("L^-1", F.forward), ("L^-T", F.backward)):
            times = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                Y = fn(X)
                times.append(time.perf_counter() - t)
            err = np.abs(Y - exact[name]).max() / np.abs(exact[name]).max()
            print(
                f"  {name}: " + ", ".join(f"{x:.3f}" for x in times) + f" s; max |error| / "
                f"max |CHOLMOD| {err:.1e}",
                flush=True,
            )
        # ||F^-1 S F^-T - I||: F = P^T L in the panels' precision (L L^T = P S P^T)
        perm = f.P()
        Sp = S[perm][:, perm]
        v = np.random.default_rng(1).standard_normal(n)
        lam = 0.0
        for _ in range(a.power):
            v /= np.linalg.norm(v)
            w = F.forward(Sp @ F.backward(v)) - v
            lam = float(v @ w)
            v = w
        print(f"  ||F^-1 S F^-T - I||: {abs(lam):.1e} ({a.power} power iterations)", flush=True)
        del F


if __name__ == "__main__":
    main()
