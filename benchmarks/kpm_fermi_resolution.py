"""KPM resolution at the Fermi level: the moments it saves, and what it does to hole counts.

    python benchmarks/kpm_fermi_resolution.py OUT_DIR [--atoms 120] [--width 0.1]
                                              [--seeds 0 1 2 3] [--random 16]

The Jackson kernel is narrowest at the ends of the Chebyshev interval (its standard
deviation goes as sqrt(1 - x^2)), so a DOS resolved to ``--width`` at E_F, where E_F lies
far from the interval's centre, needs fewer moments than one resolved to it everywhere.
``KPMSpectrum`` with ``kpm['resolution_at'] = 'fermi'`` finds E_F from the first moments
(a probe) and stops when the resolution within 1.5 eV of it is reached.

On GPAW's own H and S of a piece of the WSe2/HfO2:Ni device (``device_piece.py``: Gamma,
szp(dzp), deep states out of the interval as at device scale), for 'interval' and 'fermi'
and each seed: the moments, the probe's E_F and the final one against the exact level, the
resolution at E_F, and the W+Se states (both spins) in [E_F, E_F + 0.2 eV] with their
stochastic error.  The exact references: the sharp count, and the count broadened by each
mode's kernel (the exact eigenvalues and Mulliken weights, the same interval, moments and
E_F): the difference between those two is what the kernel does to the window.
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
from device_piece import gamma_matrices  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder of the piece's GPAW run (made when absent)")
    p.add_argument("--atoms", type=int, default=120)
    p.add_argument("--width", type=float, default=0.1, help="resolution asked for, eV")
    p.add_argument("--window", type=float, default=0.2, help="hole window above E_F, eV")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--random", type=int, default=16, help="random vectors per run")
    a = p.parse_args(argv)
    from ase_gearsh.electronic.kpm import (
        jackson_kernel,
        kpm_fermi_level,
        kpm_fermi_window_count,
        kpm_resolution,
        moments_from_eigen,
    )
    from ase_gearsh.electronic.spectrum import KPMSpectrum, OrbitalLabels

    Hd, Sd, counts, sym, nel = gamma_matrices(a.out, a.atoms)
    labels = OrbitalLabels.from_counts(counts, sym)
    E, C = la.eigh(Hd, Sd)
    n_occ = int(round(nel / 2))
    ef_exact = 0.5 * (E[n_occ - 1] + E[n_occ])
    hole = np.isin(np.array(sym, dtype=object)[labels.atom_of], ["W", "Se"])
    weights = ((Sd @ C) * C)[hole].sum(axis=0)  # Mulliken weight of W+Se per state
    print(
        f"{len(sym)} atoms, {len(E)} orbitals, {nel:g} electrons; exact E_F {ef_exact:.3f} eV "
        f"(highest occupied {E[n_occ - 1]:.3f}, lowest empty {E[n_occ]:.3f})"
    )
    H, S = sp.csr_array(Hd), sp.csr_array(Sd)
    base = KPMSpectrum(H, S, labels, {"n_random": a.random}, n_electrons=nel)
    lo, hi = base.bounds
    deep = base.deep
    n_deep = 0 if deep is None else deep.count
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    print(
        f"interval {lo:.2f} .. {hi:.2f} eV ({n_deep} deep states out of it); exact E_F at "
        f"x = {(ef_exact - centre) / half:+.3f}"
    )

    def exact_count(mom, ef):
        """W+Se states (both spins) in [ef, ef + window]: the exact states broadened by the
        kernel of ``mom`` (deep states excluded: far below the window), and sharp."""
        M = mom.moments.shape[1]
        keep = slice(n_deep, None)
        mu = moments_from_eigen(E[keep], weights[keep], mom.center, mom.half_width, M)[0]
        x = np.clip((np.array([ef, ef + a.window]) - mom.center) / mom.half_width, -1, 1)
        t_lo, t_hi = np.arccos(x)
        m = np.arange(1, M)
        c = np.empty(M)
        c[0] = t_lo - t_hi
        c[1:] = 2.0 * (np.sin(m * t_lo) - np.sin(m * t_hi)) / m
        broadened = 2.0 * float(mu @ (c * jackson_kernel(M) / np.pi))
        sel = (E >= ef) & (E <= ef + a.window)
        return broadened, 2.0 * float(weights[sel].sum())

    print(
        "mode      seed  moments  time_s  probe_E_F  E_F     res_at_E_F  W+Se_KPM        "
        "exact_same_kernel  sharp"
    )
    for mode in ("interval", "fermi"):
        for seed in a.seeds:
            spec = base.with_options({"n_random": a.random, "seed": seed, "resolution_at": mode})
            t = time.perf_counter()
            mom = spec.moments(a.width, ["W", "Se"])
            dt = time.perf_counter() - t
            M = mom.moments.shape[1]
            ef = kpm_fermi_level(mom.rows(mom.names[:1]), nel)
            count, err, _ = kpm_fermi_window_count(mom, nel, a.window, "W+Se")
            broad, sharp = exact_count(mom, ef)
            probe = spec._fermi_guess
            print(
                f"{mode:9s} {seed:4d}  {M:7d}  {dt:6.2f}  "
                f"{'' if probe is None else f'{probe:9.3f}':>9s}  {ef:6.3f}  "
                f"{kpm_resolution((lo, hi), M, ef):10.4f}  "
                f"{2 * count:6.2f} +- {2 * err:4.2f}  {broad:17.2f}  {sharp:5.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
