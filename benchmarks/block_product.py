"""The KPM step's product with H at device scale: row by row against runs of atom rows.

    python benchmarks/block_product.py [--atoms 3999] [--vectors 16 32] [--repeat 5]

Builds the device structure (``device_structure.py``), predicts H with a randomly
initialised model of the paper's hyperparameters (``device_scale.py``; only the
sparsity pattern matters here) and S (screen 1e-8), and times ``A @ X`` for blocks of
random vectors with :func:`csr_times_block` (one row at a time) and
:class:`BlockProduct` (runs of rows with the same columns, found once), checking that
both give the same numbers.  Prints the runs found and the best and median times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_scale import paper_model  # noqa: E402
from device_structure import build_device  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=3999)
    p.add_argument("--vectors", type=int, nargs="+", default=[16, 32])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    from ase_gearsh import GearsHCalculator
    from ase_gearsh.electronic.sparse_products import BlockProduct, csr_times_block

    atoms = build_device(a.atoms, seed=0)
    atoms.calc = GearsHCalculator(paper_model(), warn_extrapolation=False)
    H = atoms.calc.get_hamiltonian()
    S = atoms.calc.get_overlap()
    print(f"{len(atoms)} atoms, {H.shape[0]} orbitals; H nnz {H.nnz:,}, S nnz {S.nnz:,}")
    for name, A in (("H (predicted)", H), ("S (screened 1e-8)", S)):
        t = time.perf_counter()
        bp = BlockProduct(A)
        prep = time.perf_counter() - t
        runs = "none (rows one by one: the row kernel)"
        if bp.runs is not None:
            runs = f"{len(bp.runs) - 1} (mean {np.diff(bp.runs).mean():.1f} rows)"
        print(f"{name}: runs of rows with equal columns {runs}; found in {prep:.3f} s")
        for k in a.vectors:
            X = np.random.default_rng(0).standard_normal((A.shape[1], k))
            same = np.array_equal(csr_times_block(A, X), bp @ X)
            rows, grouped = [], []
            for _ in range(a.repeat):  # interleaved
                t = time.perf_counter()
                csr_times_block(A, X)
                rows.append(time.perf_counter() - t)
                t = time.perf_counter()
                bp @ X
                grouped.append(time.perf_counter() - t)
            print(
                f"  {k} vectors: row by row {min(rows):.3f} s (median {np.median(rows):.3f}), "
                f"runs {min(grouped):.3f} s (median {np.median(grouped):.3f}); "
                f"same numbers: {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
