"""Run GPAW LCAO calculations for many structures (resumable, isolated failures).

Usage::

    python -m gpaw_tools.generate STRUCTURES.extxyz -o RUNS_DIR [--kpts 5 5 1] \
        [--jobs 2] [--extract DATASET_DIR]

Every structure of every input file (anything ``ase.io.read`` understands)
becomes ``RUNS_DIR/<file stem>-<index>.gpw`` with its GPAW log beside it
(``.txt``).  Finished structures are skipped on a re-run; a failure writes
``<name>.error`` and does not stop the others.  Defaults follow the GEARS H
paper: basis ``szp(dzp)``, PBE, grid spacing 0.2 A, Gamma point only, density
converged to 1e-3 electrons per valence electron.  With ``--kpts`` the run uses
a Gamma-centred grid with ``symmetry='off'`` so that real-space blocks H(R) can
be extracted.

User basis sets (for example confined basis sets made with GPAW's basis
generator, ``gpaw-basis``) are files named ``<Symbol>.<name>.basis``: pass
their folder with ``--basis-dir DIR`` and select them per element with
``--element-basis Hf=confined.dzp`` (GPAW's ``basis={'Hf': 'confined.dzp'}``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ase_gearsh.core.errors import GearsHError
from ase_gearsh.core.io import OutputLock
from ase_gearsh.core.processes import (
    WORKER_THREADS,
    Interrupted,
    interrupt_on_sigterm,
    interrupted,
    run_pool,
)
from ase_gearsh.core.schema import read_structure

from .extract import extract_files, extract_run

__all__ = ["RunSettings", "run_structure", "generate", "read_structures", "main"]


@dataclass
class RunSettings:
    basis: str = "szp(dzp)"
    element_basis: dict = field(default_factory=dict)
    basis_dir: str | None = None
    xc: str = "PBE"
    h: float = 0.2
    kpts: tuple | None = None  # Gamma-centred grid, None: Gamma only
    density: float = 1e-3
    vacuum: float = 5.0  # added around molecules without a cell
    charge: float = 0.0
    spinpol: bool = False
    extract_to: str | None = None  # dataset folder: extract each run in its worker
    keep_gpw: bool = True  # with extract_to: False removes the .gpw once extracted
    maxiter: int = 333
    extra: dict = field(default_factory=dict)

    def gpaw_parameters(self, log) -> dict:
        basis = dict(self.element_basis)
        basis = {"default": self.basis, **basis} if basis else self.basis
        params = dict(
            mode="lcao",
            basis=basis,
            xc=self.xc,
            h=self.h,
            txt=str(log),
            convergence={"density": self.density},
            charge=self.charge,
            spinpol=self.spinpol,
            maxiter=self.maxiter,
        )
        if self.kpts is not None:
            params["kpts"] = {"size": tuple(int(k) for k in self.kpts), "gamma": True}
            params["symmetry"] = "off"
        params.update(self.extra)
        return params


def _prepare(atoms, settings: RunSettings):
    atoms = atoms.copy()
    atoms.calc = None
    if atoms.cell.rank < 3:
        if atoms.pbc.any():
            raise ValueError(
                f"periodic structure with a degenerate cell "
                f"{atoms.cell.cellpar().round(3).tolist()}"
            )
        atoms.center(vacuum=settings.vacuum)
    return atoms


@contextmanager
def _setup_paths(basis_dir: str | None) -> Iterator[None]:
    """GPAW's ``setup_paths`` with ``basis_dir`` first, for the duration of the
    block only (the caller's list is restored: no process-wide change)."""
    if not basis_dir:
        yield
        return
    from gpaw import setup_paths

    saved = list(setup_paths)
    setup_paths.insert(0, str(Path(basis_dir).resolve()))
    try:
        yield
    finally:
        setup_paths[:] = saved


def run_structure(atoms, name: str, outdir: str | Path, settings: RunSettings) -> Path:
    """Run one LCAO SCF and write ``outdir/name.gpw`` atomically (a failure writes
    ``name.error`` with the traceback and re-raises)."""
    outdir = Path(outdir)
    gpw = outdir / f"{name}.gpw"
    log = outdir / f"{name}.txt"
    error = outdir / f"{name}.error"
    from gpaw import GPAW

    tmp = outdir / f".{name}.gpw.part"
    try:
        with _setup_paths(settings.basis_dir):
            atoms = _prepare(atoms, settings)
            calc = GPAW(**settings.gpaw_parameters(log))
            atoms.calc = calc
            atoms.get_potential_energy()
            calc.write(str(tmp))
            os.replace(tmp, gpw)
            if settings.extract_to is not None:  # from the live calculator: no restart
                extract_run(calc, gpw, settings.extract_to)
                if not settings.keep_gpw:
                    gpw.unlink()
    except Exception:
        if not interrupted():  # an interrupt can surface as another exception
            error.write_text(traceback.format_exc())
        raise
    finally:  # also on Ctrl-C and SIGTERM, which are not failures of the run
        tmp.unlink(missing_ok=True)
    if error.exists():
        error.unlink()
    return gpw


def _worker(args):
    """One run in a worker process: (name, seconds, None) or (name, None, message);
    an interrupt (SIGTERM from the parent or its death) ends the process at once."""
    atoms, name, outdir, settings = args
    t0 = time.perf_counter()
    try:
        run_structure(atoms, name, outdir, settings)
    except Exception as err:
        if interrupted():  # SIGTERM seen as another error (e.g. during an import)
            os._exit(128 + signal.SIGTERM)
        return name, None, f"{type(err).__name__}: {err}"
    except BaseException:  # SystemExit from SIGTERM: clean-up done, leave now
        os._exit(128 + signal.SIGTERM)
    return name, time.perf_counter() - t0, None


def read_structures(paths, index: str = ":") -> list[tuple]:
    """(name, atoms) for every structure in every file, in a deterministic order."""
    from ase.io import read

    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"structure file {str(path)!r} does not exist")
        try:
            images = read(str(path), index=index)
        except Exception as err:
            raise ValueError(f"ASE cannot read {str(path)!r}: {err}") from err
        if not isinstance(images, list):
            images = [images]
        for k, atoms in enumerate(images):
            out.append((f"{path.stem}-{k:05d}", atoms))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("two input files share a file stem; rename one of them")
    return out


def generate(
    structures, outdir: str | Path, settings: RunSettings, jobs: int = 1, progress: bool = True
) -> tuple[list, list, list]:
    """Run every (name, atoms) not already done. Returns (done, skipped, failed).

    With ``jobs > 1`` the runs go to spawned worker processes with one BLAS/OpenMP
    thread each (unless the user set the thread variables); the caller's
    environment is the same afterwards."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with OutputLock(outdir, what="output folder (-o)"):
        for stale in outdir.glob(".*.gpw.part"):  # from a run killed with -9
            stale.unlink(missing_ok=True)
        return _generate(structures, outdir, settings, jobs, progress)


def _generate(structures, outdir: Path, settings: RunSettings, jobs: int, progress: bool):
    todo, skipped = [], []
    for name, atoms in structures:
        if (outdir / f"{name}.gpw").exists() or _extracted(name, settings):
            skipped.append(name)
        else:
            todo.append((atoms, name, outdir, settings))
    done, failed = [], []
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="GPAW LCAO", unit="run", disable=not progress)
    if jobs <= 1:
        results = (_run_here(task) for task in todo)
    else:
        results = run_pool(_worker, todo, jobs, environment_values=WORKER_THREADS)
    with contextlib.closing(results) as it, bar:
        for name, _, message in it:
            if message is None:
                done.append(name)
            else:
                failed.append((name, message))
            bar.update()
    return sorted(done), skipped, sorted(failed)


def _extracted(name: str, settings: RunSettings) -> bool:
    """The run's dataset entry exists (a run whose .gpw was not kept is done)."""
    if settings.extract_to is None or settings.keep_gpw:
        return False
    entry = Path(settings.extract_to) / f"{name}.npz"
    try:
        return read_structure(entry)[1]["source"]["name"] == f"{name}.gpw"
    except (OSError, GearsHError):
        return False


def _run_here(task):
    """One run in this process (Ctrl-C and SIGTERM propagate)."""
    atoms, name, outdir, settings = task
    t0 = time.perf_counter()
    try:
        run_structure(atoms, name, outdir, settings)
    except Exception as err:
        return name, None, f"{type(err).__name__}: {err}"
    return name, time.perf_counter() - t0, None


def main(argv: list[str] | None = None) -> int:
    """``python -m gpaw_tools.generate``: exit status 0, 1 (some runs or extractions
    failed) or 2 (bad arguments or input, one line on stderr)."""
    p = argparse.ArgumentParser(
        prog="python -m gpaw_tools.generate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("structures", nargs="+", help="ASE-readable structure files")
    p.add_argument("-o", "--output", required=True, help="folder for .gpw files and logs")
    p.add_argument("--index", default=":", help="ASE index of the images to run (default :)")
    p.add_argument("--basis", default="szp(dzp)", help="basis set (default szp(dzp))")
    p.add_argument(
        "--element-basis",
        action="append",
        default=[],
        metavar="EL=NAME",
        help="basis of one element, e.g. Hf=confined.dzp (repeatable)",
    )
    p.add_argument("--basis-dir", help="folder holding user basis files <El>.<name>.basis")
    p.add_argument("--xc", default="PBE")
    p.add_argument("--h", type=float, default=0.2, help="grid spacing in A (default 0.2)")
    p.add_argument(
        "--kpts",
        type=int,
        nargs=3,
        metavar="N",
        help="Gamma-centred k-grid (symmetry off); default: Gamma only",
    )
    p.add_argument(
        "--density",
        type=float,
        default=1e-3,
        help="density convergence (electrons per valence electron)",
    )
    p.add_argument(
        "--vacuum", type=float, default=5.0, help="vacuum (A) around structures without a cell"
    )
    p.add_argument("--charge", type=float, default=0.0)
    p.add_argument("--spinpol", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="parallel GPAW processes")
    p.add_argument(
        "--extract", metavar="DATASET_DIR", help="extract every finished run into this dataset"
    )
    p.add_argument(
        "--discard-gpw",
        action="store_true",
        help="with --extract: remove each .gpw once its structure is in the dataset "
        "(the dataset entry is a few percent of the .gpw's size)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    element_basis = {}
    for item in a.element_basis:
        if "=" not in item:
            p.error(f"--element-basis expects EL=NAME, got {item!r}")
        el, name = item.split("=", 1)
        element_basis[el] = name
    if a.basis_dir and not Path(a.basis_dir).is_dir():
        p.error(f"--basis-dir {a.basis_dir!r} is not a folder")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    for option, value, ok, expected in (
        ("--h", a.h, a.h > 0, "> 0 (grid spacing, A)"),
        ("--vacuum", a.vacuum, a.vacuum >= 0, ">= 0 (A)"),
        ("--density", a.density, a.density > 0, "> 0"),
        ("--charge", a.charge, True, "finite"),
    ):
        if not (ok and math.isfinite(value)):
            p.error(f"{option} must be a finite number {expected}, got {value}")
    settings = RunSettings(
        basis=a.basis,
        element_basis=element_basis,
        basis_dir=a.basis_dir,
        xc=a.xc,
        h=a.h,
        kpts=tuple(a.kpts) if a.kpts else None,
        density=a.density,
        vacuum=a.vacuum,
        charge=a.charge,
        spinpol=a.spinpol,
        extract_to=a.extract,
        keep_gpw=not a.discard_gpw,
    )
    if a.discard_gpw and not a.extract:
        p.error("--discard-gpw needs --extract DATASET_DIR (the dataset keeps what is needed)")
    try:
        with interrupt_on_sigterm():
            return _run(a, settings)
    except Interrupted as stop:
        print(
            f"{p.prog}: interrupted ({stop}): finished runs are kept, unfinished ones "
            "left nothing behind; run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + stop.signum
    except (GearsHError, OSError, ValueError) as err:
        print(f"{p.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace, settings: RunSettings) -> int:
    """The command after argument parsing: runs, report, optional extraction."""
    structures = read_structures(a.structures, a.index)
    t0 = time.perf_counter()
    done, skipped, failed = generate(
        structures, a.output, settings, jobs=a.jobs, progress=not a.quiet
    )
    print(
        f"{len(done)} run, {len(skipped)} already done, {len(failed)} failed "
        f"-> {a.output} ({time.perf_counter() - t0:.1f} s)"
    )
    for name, msg in failed:
        print(
            f"  failed: {name}: {msg} (see {Path(a.output) / (name + '.error')})", file=sys.stderr
        )
    status = 1 if failed else 0
    if a.extract:  # each run was extracted in its worker; this catches earlier runs
        gpws = [
            Path(a.output) / f"{n}.gpw"
            for n, _ in structures
            if (Path(a.output) / f"{n}.gpw").exists()
        ]
        with _setup_paths(a.basis_dir):  # GPAW re-reads the basis files on restart
            written, present, bad = extract_files(
                gpws, a.extract, progress=not a.quiet, jobs=a.jobs
            )
        earlier = len(present) if a.discard_gpw else len(present) - len(done)
        print(
            f"{len(done)} extracted after their run, {len(written)} from earlier runs' .gpw "
            f"files, {earlier} already present, {len(bad)} failed -> {a.extract}"
        )
        for path, msg in bad:
            print(f"  failed: {path}: {msg}", file=sys.stderr)
        status = status or (1 if bad else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
