"""Speed of the exact sparse overlap S: new ``gpaw_tools.overlap`` against the previous
implementation (``benchmarks/_overlap_reference.py``), back to back in one process.

    python benchmarks/overlap_speed.py [--atoms 1000 4000] [--repeat 1] [--no-reference]

For each size the device structure of ``device_structure.py`` (amorphous HfO2:Ni under
2H-WSe2) is built and S at Gamma is timed with both implementations (szp(dzp) basis,
PBE setups; the Fourier-Bessel expansions of every species pair are computed first, on
a small warm-up structure, so only the per-structure work is timed).  Printed: times,
their ratio, the peak memory allocated during each call (tracemalloc: numpy arrays),
the max RSS of the process, nnz and max |S_new - S_old|.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from device_structure import build_device  # noqa: E402

ELEMENTS = ["O", "Ni", "Se", "Hf", "W"]


def warm_up(calc) -> None:
    """Compute every species-pair expansion (and, new code, its product table) once:
    they are cached per calculator and are not per-structure work."""
    rcut = calc._transformer(sorted(ELEMENTS))
    for kind in "OP":
        for s1 in ELEMENTS:
            for s2 in ELEMENTS:
                (getattr(calc, "_table", None) or calc._expansion)(kind, s1, s2, rcut)


def timed(calc, atoms, repeat: int):
    """(best seconds, S of the last call, peak traced bytes of the last call)."""
    best = np.inf
    for _ in range(repeat):
        tracemalloc.start()
        t = time.perf_counter()
        S = calc.overlap(atoms)
        best = min(best, time.perf_counter() - t)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return best, S, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--atoms",
        type=int,
        nargs="+",
        default=[1000, 4000],
        help="structure sizes (e.g. 200 for a quick run)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per implementation (best)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="time the new code only")
    args = p.parse_args(argv)

    import _overlap_reference as reference

    from gpaw_tools import overlap as new

    species = new.species_from_gpaw(ELEMENTS, xc="PBE", basis="szp(dzp)")
    calcs = {"new": new.OverlapCalculator(species)}
    if not args.no_reference:
        calcs["old"] = reference.OverlapCalculator(species)
    for c in calcs.values():
        warm_up(c)
    print(f"{__import__('os').cpu_count()} CPU cores; best of {args.repeat} run(s) each")
    for n in args.atoms:
        atoms = build_device(n, seed=args.seed)
        res = {}
        for name, calc in calcs.items():
            res[name] = timed(calc, atoms, args.repeat)
            t, S, peak = res[name]
            print(
                f"{len(atoms):5d} atoms, {S.shape[0]} orbitals  {name}: {t:7.2f} s, "
                f"peak allocated {peak / 2**30:5.2f} GiB, nnz {S.nnz:,}",
                flush=True,
            )
        if "old" in res:
            (t1, S1, _), (t0, S0, _) = res["new"], res["old"]
            diff = abs(S1 - S0).max()
            print(
                f"{len(atoms):5d} atoms  speed-up {t0 / t1:.1f}x, max |S_new - S_old| = {diff:.2e}",
                flush=True,
            )
        del res
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"max RSS of the process {rss:.2f} GiB")


if __name__ == "__main__":
    main()
