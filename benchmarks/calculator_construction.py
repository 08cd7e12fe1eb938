"""Cost of a new ``GearsHCalculator``: first construction, construction on an already
loaded model, and scoring many small molecules with one new calculator each.

    python benchmarks/calculator_construction.py [--model models/molecules.ckpt]

Checkpoints are loaded once per process (``ase_gearsh.model.engine.load_model``)
and the compiled network and overlap tables are shared per model, so only the
first construction reads the file; later ones cost milliseconds.  "Scoring" a
molecule is H, S, the eigenvalues and the Fermi level.
"""

from __future__ import annotations

import argparse
import statistics
import time

MOLECULES = [
    "CH4",
    "H2O",
    "NH3",
    "CH3OH",
    "C2H6",
    "HCOOH",
    "CH3CHO",
    "C2H4",
    "HCN",
    "CH3CN",
    "H2CO",
    "CO2",
    "N2",
    "C2H2",
    "CH3OCH3",
]


def molecules(n: int, seed: int = 0):
    """``n`` rattled small molecules (C, H, N, O), cycling over ``MOLECULES``."""
    from ase.build import molecule

    out = []
    for k in range(n):
        a = molecule(MOLECULES[k % len(MOLECULES)])
        a.rattle(0.03, seed=seed + k)
        a.center(vacuum=3.0)
        out.append(a)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/molecules.ckpt")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--molecules", type=int, default=30)
    a = p.parse_args(argv)
    import warnings

    from ase_gearsh import GearsHCalculator
    from ase_gearsh.model.coverage import ExtrapolationWarning

    warnings.simplefilter("ignore", ExtrapolationWarning)

    t = time.perf_counter()
    first = GearsHCalculator(a.model)
    t_first = time.perf_counter() - t
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        calc = GearsHCalculator(a.model)
        times.append(time.perf_counter() - t)
        assert calc.model is first.model
    print(f"model {a.model}")
    print(f"first construction (loads the checkpoint):  {1e3 * t_first:9.1f} ms")
    print(
        f"construction on the loaded model (median of {a.repeat}): "
        f"{1e3 * statistics.median(times):9.3f} ms"
    )

    images = molecules(a.molecules)
    warm = images[0].copy()  # compile the network once, outside the timing
    warm.calc = GearsHCalculator(a.model)
    warm.calc.get_fermi_level()
    t = time.perf_counter()
    per = []
    for atoms in images:
        t1 = time.perf_counter()
        atoms.calc = GearsHCalculator(a.model)
        atoms.calc.get_hamiltonian()
        atoms.calc.get_overlap()
        atoms.calc.get_eigenvalues()
        atoms.calc.get_fermi_level()
        per.append(time.perf_counter() - t1)
    total = time.perf_counter() - t
    formulas = sorted({x.get_chemical_formula() for x in images})
    print(
        f"{len(images)} molecules ({len(formulas)} kinds, {min(len(x) for x in images)}-"
        f"{max(len(x) for x in images)} atoms), one new calculator each: {total:.2f} s "
        f"({1e3 * total / len(images):.1f} ms per molecule, median "
        f"{1e3 * statistics.median(per):.1f} ms, max {1e3 * max(per):.1f} ms)"
    )


if __name__ == "__main__":
    main()
