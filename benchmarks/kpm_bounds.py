"""The cost and accuracy of KPM's spectral bounds for Lanczos tolerances, on a tiled DFT cell.

    python benchmarks/kpm_bounds.py DATASET [--index 1] [--repeat 3]
                                    [--tolerances 1e-3 3e-3 1e-2] [--deep-below auto]
                                    [--methods lanczos arpack]

The cell's H(R) and S(R) tiled ``--repeat`` x ``--repeat`` in the plane (as
``kpm_supercell.py``), whose exact spectrum comes from the cell at the folded k-points.
For each tolerance (``ase_gearsh.electronic.kpm.BOUNDS_RTOL``), with the deep states
in the interval and out of it (``--deep-below``, as the calculator's default 'auto'):
the Lanczos products (two triangular solves and one product with H each), their time,
and both ends without margins against the exact ones, for ``--methods``: the package's
Lanczos and scipy's ARPACK (as before).  One Cholesky factor for all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kpm_supercell import folded_reference  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--index", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--deep-below", default="auto", help="eV or 'auto'")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=("lanczos", "arpack"),
        default=["lanczos", "arpack"],
        help="lanczos: ase_gearsh's (full reorthogonalisation, convergence checked every "
        "other step); arpack: scipy's eigsh (k=2, 'BE', 20 Lanczos vectors between "
        "restarts), as before; each in turn",
    )
    a = p.parse_args(argv)
    import scipy.sparse.linalg as sla

    from ase_gearsh.core.data import Dataset
    from ase_gearsh.electronic import kpm
    from ase_gearsh.electronic.deflation import deep_states

    s = Dataset(a.dataset)[a.index]
    r = a.repeat
    E, _, _ = folded_reference(s, r)
    H = s.blocks("H").supercell((r, r, 1)).matrix()
    S = s.blocks("S").supercell((r, r, 1)).matrix()
    factor = kpm.CholeskyFactor(S)
    atom_of = np.repeat(np.arange(r * r * len(s.atoms)), np.tile(s.orbital_counts, r * r))
    below = a.deep_below if a.deep_below == "auto" else float(a.deep_below)
    deep = deep_states(H, S, atom_of, below)
    print(
        f"{r * r * len(s.atoms)} atoms, {H.shape[0]} orbitals; exact spectrum {E[0]:.3f} .. "
        f"{E[-1]:.3f} eV, without the {deep.count} deep states {E[deep.count]:.3f} .. "
        f"{E[-1]:.3f} eV",
        flush=True,
    )
    lanczos = kpm._lanczos_ends
    count = [0]

    def counted(method):
        def ends(matvec, v0, rtol):
            def mv(v):
                count[0] += 1
                return matvec(v)

            if method == "lanczos":
                return lanczos(mv, v0, rtol)
            op = sla.LinearOperator((v0.size, v0.size), matvec=mv, dtype=np.float64)
            ev = sla.eigsh(op, k=2, which="BE", v0=v0, tol=rtol, return_eigenvectors=False)
            return np.sort(ev)

        return ends

    default = kpm.BOUNDS_RTOL
    try:
        for d in (None, deep):
            lo_ex = E[0] if d is None else E[d.count]
            for method in a.methods:
                kpm._lanczos_ends = counted(method)
                for tol in a.tolerances:
                    kpm.BOUNDS_RTOL = tol
                    count[0] = 0
                    t = time.perf_counter()
                    lo, hi = kpm.spectral_bounds(H, S, margin=0.0, factor=factor, deep=d)
                    dt = time.perf_counter() - t
                    print(
                        f"{'deep states out' if d is not None else 'all states     '}  "
                        f"{method:7s} tolerance {tol:g}{' (default)' if tol == default else ''}"
                        f": {count[0]} products in {dt:.1f} s; ends {lo:.3f} .. {hi:.3f} eV, "
                        f"off by {lo - lo_ex:+.3f} / {hi - E[-1]:+.3f} eV",
                        flush=True,
                    )
    finally:
        kpm._lanczos_ends, kpm.BOUNDS_RTOL = lanczos, default


if __name__ == "__main__":
    main()
