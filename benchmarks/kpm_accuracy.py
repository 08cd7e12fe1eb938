"""Kernel polynomial DOS/PDOS against dense diagonalisation on a ~1000-atom structure.

    python benchmarks/kpm_accuracy.py MODEL [--cell CELL] [--repeat 24] [--vacancies 4]
                                      [--width 0.1] [--random 16 32 64]

The trained model predicts H of a large sheet (``--cell`` repeated in-plane, with
vacancies: the tutorial's structure), S is exact.  The DOS and the species-projected
DOS from dense LAPACK (Gaussian broadening ``width``) are compared with KPM at
the same resolution (Jackson kernel, ``pi a / M = width``) for several numbers of
random vectors: integrated-DOS error (states), L1 error, and the states projected
on each species within 0.2 eV above E_F (the paper's hole-concentration window).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tutorials"))
from device_workflow import large_sheet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--cell", help="small cell (ase.io); default: ideal h-BN")
    p.add_argument("--repeat", type=int, default=24)
    p.add_argument("--vacancies", type=int, default=4)
    p.add_argument("--vacancy-species", default="N")
    p.add_argument("--width", type=float, default=0.1)
    p.add_argument("--random", type=int, nargs="+", default=[16])
    a = p.parse_args(argv)
    from ase.build import graphene
    from ase.io import read

    from ase_gearsh import GearsHCalculator

    cell = read(a.cell) if a.cell else graphene(formula="BN", a=2.504, vacuum=5.0)
    atoms = large_sheet(cell, a.repeat, a.vacancies, 0.01, 0.02, 0, a.vacancy_species)
    calc = GearsHCalculator(a.model)
    atoms.calc = calc
    t = time.perf_counter()
    H, S = calc.get_hamiltonian(), calc.get_overlap()
    print(
        f"{len(atoms)} atoms ({atoms.get_chemical_formula()}), {H.shape[0]} orbitals, "
        f"H nnz {H.nnz:,}, S nnz {S.nnz:,}; H and S in {time.perf_counter() - t:.1f} s"
    )
    t = time.perf_counter()
    e, dos = calc.get_dos(width=a.width, npts=4001, method="dense")
    _, pd = calc.get_pdos(width=a.width, npts=4001, method="dense")
    ef = calc.get_fermi_level()
    t_dense = time.perf_counter() - t
    de = e[1] - e[0]
    n = H.shape[0]
    win = (e >= ef) & (e <= ef + 0.2)
    print(
        f"dense (eigenvalues and eigenvectors): {t_dense:.1f} s; E_F = {ef:.3f} eV; "
        f"spectrum {e[0]:.1f} .. {e[-1]:.1f} eV"
    )
    print(
        f"{'R':>4s} {'moments':>8s} {'time s':>7s} {'int. DOS err':>13s} {'L1 err':>7s}  "
        + "  ".join(f"{s + ' int.err':>11s}" for s in pd)
        + "  "
        + "  ".join(f"{s + ' [EF,EF+.2]':>13s}" for s in pd)
    )
    print(
        f"{'dense':>4s} {'':>8s} {t_dense:7.1f} {'':>13s} {'':>7s}  "
        + "  ".join(f"{'':>11s}" for s in pd)
        + "  "
        + "  ".join(f"{np.trapezoid(pd[s][win], e[win]):13.4f}" for s in pd)
    )
    for R in a.random:
        calc.set(kpm={"n_moments": None, "n_random": R, "seed": 0})
        t = time.perf_counter()
        _, pk = calc.get_pdos(width=a.width, npts=4001, emin=e[0], emax=e[-1], method="kpm")
        _, dk = calc.get_dos(width=a.width, npts=4001, emin=e[0], emax=e[-1], method="kpm")
        dt = time.perf_counter() - t
        M = calc.kpm_moments(a.width).moments.shape[1]
        err = np.abs(np.cumsum(dk - dos) * de).max()
        errs = [np.abs(np.cumsum(pk[s] - pd[s]) * de).max() for s in pd]
        print(
            f"{R:4d} {M:8d} {dt:7.1f} {err:8.2f} ({100 * err / n:.2f}%) "
            f"{100 * np.abs(dk - dos).sum() * de / n:6.2f}%  "
            + "  ".join(f"{x:11.2f}" for x in errs)
            + "  "
            + "  ".join(f"{np.trapezoid(pk[s][win], e[win]):13.4f}" for s in pd)
        )


if __name__ == "__main__":
    main()
