"""Speed of the exact sparse overlap S: ``gpaw_tools.overlap`` against the previous
implementations, back to back in one process.

    python benchmarks/overlap_speed.py [--atoms 1000 4000] [--repeat 1] [--no-reference]
                                       [--numpy] [--threads N] [--screen 1e-8 ...]
                                       [--eigen-check DATASET] [--new-structure]

For each size the device structure of ``device_structure.py`` (amorphous HfO2:Ni under
2H-WSe2) is built and S at Gamma is timed with

* ``numba``: the compiled engine (``OverlapCalculator(engine='numba')``), when numba is
  installed;
* ``numpy`` (``--numpy``): the engine without compiled code (the implementation before
  the compiled one);
* ``reference`` (unless ``--no-reference``): ``benchmarks/_overlap_reference.py``, the
  implementation before the sparse layouts;
* ``numba screen=e`` (``--screen e ...``): the compiled engine leaving out what changes
  no element by more than e (``OverlapCalculator(screen=e)``), against the exact S.

``--new-structure``: S of a new structure per call (the device structure with seeds
seed+1, seed+2, ...), as in a batch of predictions, with the compiled engine's scratch
arrays kept from call to call (``keep_buffers=True``, the default) and freed after each
call (False), interleaved, after one warm-up structure each; screen 1e-8 (or the first
``--screen``).

``--eigen-check DATASET``: for the first structure of an extracted dataset (GPAW's H and
S, e.g. the WSe2 benchmark's), the largest change of the Gamma-point eigenvalues of
(GPAW's H, S) when the exact S is replaced by the screened one, over all levels and
within E_F +- 5 eV.

szp(dzp) basis, PBE setups.  The Fourier-Bessel expansions of every species pair are
computed first, and the compiled kernels compiled (or loaded from numba's cache: the time
is printed), on a small warm-up structure, so only the per-structure work is timed.
Printed per run: time, stage times (and the seconds of each thread of the threaded
stages), the peak of memory allocated by numpy during the call (tracemalloc), the peak
growth of the resident memory during the call (sampled every 5 ms: includes what
tracemalloc does not see), nnz and max |S - S_first|.  The memory figures come from one
more call after the timed ones: the instruments slow the Python parts of a call.  The
machine's other load is not controlled: run it on an idle machine and repeat
(``--repeat``, best of).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
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


def _rss() -> int:
    """Resident memory of this process (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak growth of the resident memory while the block runs (sampled)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.base


def timed(calc, atoms, repeat: int):
    """(best seconds, S of the last call, peak traced bytes, peak RSS growth, stage times
    of the best call, thread times of the best call).  The timed calls run without
    instruments; the memory figures come from one more call, traced (tracemalloc and a
    thread sampling the resident memory slow the Python parts of a call)."""
    best, stages, threads = np.inf, {}, {}
    S = None
    for _ in range(repeat):
        S = None  # free the previous result first
        t = time.perf_counter()
        S = calc.overlap(atoms)
        dt = time.perf_counter() - t
        if dt < best:
            best = dt
            stages = dict(getattr(calc, "timings", {}))
            threads = {k: list(v) for k, v in getattr(calc, "thread_times", {}).items()}
    S = None
    tracemalloc.start()
    with RssPeak() as rss:
        S = calc.overlap(atoms)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, S, peak, rss.growth, stages, threads


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
    p.add_argument("--no-reference", action="store_true", help="skip the reference code")
    p.add_argument("--numpy", action="store_true", help="also time the numpy engine")
    p.add_argument("--threads", type=int, default=None, help="threads (default: cores)")
    p.add_argument("--screen", type=float, nargs="*", default=[], help="screened runs")
    p.add_argument("--eigen-check", default=None, help="dataset for the eigenvalue check")
    p.add_argument(
        "--new-structure",
        action="store_true",
        help="also time a new structure per call, scratch arrays kept against freed",
    )
    args = p.parse_args(argv)
    if args.eigen_check:
        eigen_check(args.eigen_check, args.screen or [1e-8])

    import _overlap_reference as reference

    from gpaw_tools import overlap as new

    species = new.species_from_gpaw(ELEMENTS, xc="PBE", basis="szp(dzp)")
    calcs = {}
    if new._compiled():
        calcs["numba"] = new.OverlapCalculator(species, engine="numba", threads=args.threads)
        for e in args.screen:
            calcs[f"numba screen={e:g}"] = new.OverlapCalculator(
                species, engine="numba", threads=args.threads, screen=e
            )
    if args.numpy or not calcs:
        calcs["numpy"] = new.OverlapCalculator(species, engine="numpy")
    if not args.no_reference:
        calcs["reference"] = reference.OverlapCalculator(species)
    small = build_device(60, seed=args.seed)
    for name, c in calcs.items():
        warm_up(c)
        t = time.perf_counter()
        c.overlap(small)  # compiles the kernels (or loads them from numba's cache)
        if name == "numba":
            print(f"numba kernels compiled or loaded: {time.perf_counter() - t:.2f} s")
    print(
        f"{os.cpu_count()} CPU cores, {len(os.sched_getaffinity(0))} usable; "
        f"best of {args.repeat} run(s) each; load average {os.getloadavg()[0]:.1f}"
    )
    for n in args.atoms:
        atoms = build_device(n, seed=args.seed)
        first = None
        for name, calc in calcs.items():
            t, S, peak, rss, stages, threads = timed(calc, atoms, args.repeat)
            diff = (
                "" if first is None else f", max |S - S_{first[0]}| = {abs(S - first[1]).max():.2e}"
            )
            print(
                f"{len(atoms):5d} atoms, {S.shape[0]} orbitals  {name}: {t:7.2f} s, "
                f"peak allocated {peak / 2**30:5.2f} GiB, RSS growth {rss / 2**30:5.2f} GiB, "
                f"nnz {S.nnz:,}{diff}",
                flush=True,
            )
            for stage, sec in stages.items():
                if stage != "total":
                    print(f"      {stage:42s} {sec:7.3f} s")
            if threads:
                per = ", ".join(
                    f"{k} {'/'.join(f'{x:.2f}' for x in v)}" for k, v in threads.items()
                )
                print(f"      seconds per thread: {per}")
            if first is None:
                first = (name, S, t)
            else:
                print(f"{len(atoms):5d} atoms  {name}: {first[2] / t:.2f}x the speed of {first[0]}")
            del S
        first = None
        if args.new_structure and new._compiled():
            new_structures(new, species, n, args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"max RSS of the process {rss:.2f} GiB")


def new_structures(new, species, n, args) -> None:
    """S of a new structure per call, keep_buffers True against False (interleaved)."""
    screen = args.screen[0] if args.screen else 1e-8
    calcs = {
        keep: new.OverlapCalculator(
            species, engine="numba", threads=args.threads, screen=screen, keep_buffers=keep
        )
        for keep in (False, True)
    }
    for c in calcs.values():
        warm_up(c)
        c.overlap(build_device(n, seed=args.seed))  # the kept buffers' first fill
    times = {keep: [] for keep in calcs}
    for r in range(args.repeat):
        atoms = build_device(n, seed=args.seed + 1 + r)
        for keep, c in calcs.items():
            with RssPeak() as rss:
                t = time.perf_counter()
                S = c.overlap(atoms)
                times[keep].append(time.perf_counter() - t)
            del S
            print(
                f"{len(atoms):5d} atoms, new structure (seed {args.seed + 1 + r}), screen "
                f"{screen:g}, keep_buffers={keep}: {times[keep][-1]:.2f} s, RSS growth "
                f"{rss.growth / 2**30:.2f} GiB",
                flush=True,
            )
    for keep, ts in times.items():
        print(f"  keep_buffers={keep}: best {min(ts):.2f} s of {len(ts)} new structure(s)")


def eigen_check(path, screens) -> None:
    """Eigenvalues of (GPAW's H, S) at Gamma with the exact and the screened S."""
    from scipy.linalg import eigh

    from ase_gearsh.core.data import Dataset
    from gpaw_tools.overlap import OverlapCalculator, species_from_gpaw

    s = Dataset(path)[0]
    atoms = s.atoms
    names = {v["name"] for v in s.basis.values()}
    if len(names) != 1:
        raise SystemExit(f"--eigen-check: expected one basis name for all elements, got {names}")
    species = species_from_gpaw(sorted(s.basis), xc="PBE", basis=names.pop())
    H = s.hamiltonian()  # Gamma, eV
    S0 = OverlapCalculator(species).overlap(atoms)
    gpaw_err = np.abs(S0.toarray() - s.overlap()).max()
    e0 = eigh(H, S0.toarray(), eigvals_only=True)
    window = np.abs(e0 - s.fermi_level) <= 5.0
    print(
        f"eigenvalue check: {len(atoms)} atoms ({atoms.get_chemical_formula()}), "
        f"{len(e0)} orbitals, {window.sum()} levels within E_F +- 5 eV; "
        f"max |S_exact - S_GPAW| = {gpaw_err:.1e}"
    )
    for e in screens:
        S = OverlapCalculator(species, screen=e).overlap(atoms)
        d = eigh(H, S.toarray(), eigvals_only=True) - e0
        print(
            f"  screen={e:g}: nnz {S.nnz:,} of {S0.nnz:,} ({S.nnz / S0.nnz:.1%}), "
            f"max |dS| {abs(S - S0).max():.1e}, max |d eigenvalue| {np.abs(d).max():.1e} eV "
            f"(E_F +- 5 eV: {np.abs(d[window]).max():.1e} eV)",
            flush=True,
        )


if __name__ == "__main__":
    main()
