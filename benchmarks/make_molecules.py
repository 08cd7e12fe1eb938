"""Generate the molecule benchmark dataset: rattled, randomly oriented snapshots.

    python benchmarks/make_molecules.py OUT_DIR [--per-molecule 48] [--jobs 2] [--names A B ...]

``--names``: other molecules of ASE's g2 set (default: the five training molecules of
the benchmark; the generalisation test uses molecules outside them).

Writes ``OUT_DIR/molecules.extxyz``, runs GPAW LCAO (szp(dzp), PBE, h=0.2 A,
Gamma point; the paper's settings) for every snapshot through
``gpaw_tools.generate`` and extracts the blocks to ``OUT_DIR/dataset``.
Resumable: re-running skips finished structures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ase.io import write

from ase_gearsh.samples import MOLECULES, molecule_snapshots


def snapshots(per_molecule: int, rattle: float, seed: int, names=MOLECULES):
    return molecule_snapshots(per_molecule, rattle, seed, names=names)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--per-molecule", type=int, default=48)
    p.add_argument("--rattle", type=float, default=0.08, help="Gaussian rattle in A")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--names", nargs="+", default=MOLECULES, help="g2 molecule names")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    xyz = out / "molecules.extxyz"
    if not xyz.exists():
        write(xyz, snapshots(args.per_molecule, args.rattle, args.seed, args.names))
    cmd = [
        sys.executable,
        "-m",
        "gpaw_tools.generate",
        str(xyz),
        "-o",
        str(out / "runs"),
        "--jobs",
        str(args.jobs),
        "--extract",
        str(out / "dataset"),
    ]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
