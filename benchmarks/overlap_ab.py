"""S of one structure from this checkout's ``gpaw_tools.overlap`` and another
checkout's, interleaved in one process (A B B A ...), so that a change to the compiled
engine is compared under the same load of a shared machine.

    python benchmarks/overlap_ab.py OTHER_CHECKOUT [--atoms 4000] [--repeat 4]
                                    [--screen 1e-8] [--threads N] [--seed 0]
                                    [--end-to-end]

OTHER_CHECKOUT: a folder holding ``gpaw_tools/overlap.py`` (e.g. ``git worktree add
/tmp/old HEAD~1``).  Both engines' species-pair tables and kernels are prepared on a
small warm-up structure and each computes the structure once before timing.  Printed
per engine: the seconds of each call, their median, the row pass (half of S in dense
buffers), the seconds its threads worked in all, and nnz; the median of each stage
(``OverlapCalculator.timings``); then the largest difference between the two S (the
same to rounding unless a change is meant to differ).

``--end-to-end``: instead, the whole prediction of ``device_scale.py`` (a randomly
initialised model of the paper's hyperparameters: network, H, and S computed alongside
the network as the calculator does at this size), with the calculator's S engine taken
from each checkout in turn (each engine's calculator kept from call to call); the
network is compiled on another structure of the same size first.  Printed: each call's
seconds and their median per engine.  (--screen and --threads do not apply: the
calculator's defaults are used.)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from device_structure import build_device  # noqa: E402
from overlap_speed import ELEMENTS, warm_up  # noqa: E402

ROW_PASS = "  rows, half (dense buffers)"


def load_other(checkout: Path):
    """The other checkout's ``gpaw_tools.overlap`` as a module of its own name."""
    path = Path(checkout) / "gpaw_tools" / "overlap.py"
    if not path.is_file():
        raise SystemExit(f"{checkout}: expected a checkout with gpaw_tools/overlap.py, not found")
    spec = importlib.util.spec_from_file_location("other_overlap", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", help="the other checkout (folder with gpaw_tools/overlap.py)")
    p.add_argument("--atoms", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=4, help="timed calls per engine")
    p.add_argument("--screen", type=float, default=1e-8, help="0: the exact S")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--end-to-end", action="store_true", help="time whole predictions")
    args = p.parse_args(argv)
    if args.end_to_end:
        return end_to_end(args)

    import gpaw_tools.overlap as this

    other = load_other(Path(args.other))
    species = this.species_from_gpaw(ELEMENTS, xc="PBE", basis="szp(dzp)")
    atoms = build_device(args.atoms, seed=args.seed)
    small = build_device(60, seed=args.seed)
    calcs = {}
    for name, module in (("this", this), ("other", other)):
        calcs[name] = module.OverlapCalculator(
            species, engine="numba", threads=args.threads, screen=args.screen
        )
        warm_up(calcs[name])
        calcs[name].overlap(small)
        calcs[name].overlap(atoms)  # first touch of the kept buffers
    print(
        f"{len(atoms)} atoms, screen {args.screen:g}, {calcs['this'].threads} threads, "
        f"{args.repeat} interleaved calls per engine (this: {Path(this.__file__).parent.parent}, "
        f"other: {args.other})"
    )
    runs = {name: [] for name in calcs}
    stages: dict = {name: [] for name in calcs}
    last = {}
    for r in range(args.repeat):
        for name in ("this", "other") if r % 2 == 0 else ("other", "this"):
            c = calcs[name]
            last[name] = None  # free the previous S first
            t = time.perf_counter()
            last[name] = c.overlap(atoms)
            dt = time.perf_counter() - t
            runs[name].append((dt, c.timings.get(ROW_PASS, np.nan), sum(c.thread_times["_k_fill"])))
            stages[name].append(dict(c.timings))
    for name, v in runs.items():
        t, rows, core = (np.array(x) for x in zip(*v))
        print(
            f"{name:5s}: {' '.join(f'{x:.2f}' for x in t)} s (median {np.median(t):.2f} s); "
            f"row pass median {np.median(rows):.2f} s, its threads {np.median(core):.2f} s in all; "
            f"nnz {last[name].nnz:,}"
        )
    names = [k for k in stages["this"][0] if k != "total"]
    names += [k for k in stages["other"][0] if k != "total" and k not in names]
    print(f"      {'stage medians (s)':40s}   this  other")
    for k in names:
        a, b = (np.median([d.get(k, np.nan) for d in stages[n]]) for n in ("this", "other"))
        print(f"      {k:40s} {a:6.3f} {b:6.3f}")
    print(f"max |S_this - S_other| = {abs(last['this'] - last['other']).max():.2e}")


def end_to_end(args) -> None:
    """Interleaved whole predictions (device_scale.py's) with each checkout's S engine."""
    import contextlib
    import io

    import device_scale
    from compilations import compilation_counter

    import ase_gearsh.calculator as calculator
    import gpaw_tools.overlap as this

    engines = {
        "this": this.OverlapCalculator,
        "other": load_other(Path(args.other)).OverlapCalculator,
    }
    compiles = compilation_counter()
    model = device_scale.paper_model()
    along = calculator.GearsHCalculator.default_parameters["overlap_alongside"]
    kept: dict = {name: {} for name in engines}  # each engine's calculator, call to call

    def predict(name, atoms):
        calculator.OverlapCalculator = engines[name]
        calculator._OVERLAPS.clear()
        calculator._OVERLAPS.update(kept[name])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            calc = device_scale.time_prediction(model, atoms, compiles, "", along, None)
        kept[name] = dict(calculator._OVERLAPS)
        return calc.total_seconds

    first = build_device(args.atoms, seed=args.seed)
    for name in engines:  # compiles the network; makes and keeps each engine's calculator
        predict(name, first)
    atoms = build_device(args.atoms, seed=args.seed + 1)
    print(
        f"{len(atoms)} atoms, whole predictions (S alongside the network), {args.repeat} "
        f"interleaved calls per engine (other: {args.other})",
        flush=True,
    )
    runs: dict = {name: [] for name in engines}
    for r in range(args.repeat):
        for name in ("this", "other") if r % 2 == 0 else ("other", "this"):
            runs[name].append(predict(name, atoms))
    for name, t in runs.items():
        print(f"{name:5s}: {' '.join(f'{x:.2f}' for x in t)} s (median {np.median(t):.2f} s)")


if __name__ == "__main__":
    main()
