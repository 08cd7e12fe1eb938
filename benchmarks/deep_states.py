"""Time of the deep states (semicore deflation) at device size, by cluster threading.

    python benchmarks/deep_states.py DATASET [--index 1] [--repeat 6] [--threads 0 2]
                                     [--repeats 1]

The WSe2 cell ``--index`` of DATASET (``make_wse2.py``; DFT H and S) tiled
``--repeat`` x ``--repeat`` (6: 3816 atoms, 43,416 orbitals, the device's size), and
``ase_gearsh.electronic.deflation.deep_states(H, S, atom_of, 'auto', threads=T)`` for
each T of ``--threads`` in turn, in one process (0: the clusters' eigenproblems one after
another with BLAS's own threads, as before threads were added; N: N threads of one BLAS
thread each).  Prints the time of each, the number of deep states, and the largest
difference of the Ritz values from the first run (the results must not depend on T).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--index", type=int, default=1)
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--threads", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs of each setting")
    a = p.parse_args(argv)
    from ase_gearsh.core.data import Dataset
    from ase_gearsh.electronic.deflation import deep_states

    s = Dataset(a.dataset)[a.index]
    r = a.repeat
    t = time.perf_counter()
    H = s.blocks("H").supercell((r, r, 1)).matrix()
    S = s.blocks("S").supercell((r, r, 1)).matrix()
    n_atoms = r * r * len(s.atoms)
    atom_of = np.repeat(np.arange(n_atoms), np.tile(s.orbital_counts, r * r))
    print(
        f"{s.atoms.get_chemical_formula()} x {r}x{r}: {n_atoms} atoms, {H.shape[0]} "
        f"orbitals, H and S in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    first = None
    for _ in range(a.repeats):
        for threads in a.threads:
            t = time.perf_counter()
            d = deep_states(H, S, atom_of, "auto", threads=threads)
            dt = time.perf_counter() - t
            first = d if first is None else first
            diff = np.abs(d.energies - first.energies).max()
            print(
                f"threads {threads}: {d.count} deep states below {d.below:.2f} eV in "
                f"{dt:.1f} s; Ritz values differ from the first run's by {diff:.1e} eV",
                flush=True,
            )


if __name__ == "__main__":
    main()
