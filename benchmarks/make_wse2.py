"""Generate the WSe2-x benchmark dataset (the paper's section 4.1.1 class, small k-sampled cells).

    python benchmarks/make_wse2.py OUT_DIR [--n 8] [--size 6] [--kpts 3] [--jobs 2]

2H-WSe2 monolayers built with ASE's ``mx2`` (lattice constant 3.32 A, Se-Se thickness
3.2 A, as in the paper), ``size x size`` primitive cells, a uniform random diagonal strain
of +-2 %, a Poisson(1) number of Se vacancies and a Gaussian rattle.  The paper uses
Gamma-point 6x3 orthogonal supercells (108 atoms) so that every matrix element belongs to
one atom pair; here the cells are small and k-sampled, and the extraction keeps the
real-space blocks H(R), S(R), which lifts that requirement.

Writes ``OUT_DIR/wse2.extxyz``, runs GPAW LCAO (szp(dzp), PBE, h = 0.25 A, the paper's
settings) on a Gamma-centred ``kpts x kpts x 1`` grid with symmetry off through
``gpaw_tools.generate`` and extracts each run into ``OUT_DIR/dataset`` (the .gpw files are
discarded).  Resumable: re-running skips finished structures, and a rerun with a larger
``--n`` adds cells (the first ones are the same).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase.build import mx2
from ase.io import read, write


def cells(
    n: int,
    seed: int,
    size: int = 6,
    strain: float = 0.02,
    rattle: float = 0.05,
    mean_vacancies: float = 1.0,
    vacuum: float = 5.0,
):
    """``n`` strained, rattled WSe2-x cells; the number of Se vacancies is Poisson(mean)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = mx2("WSe2", kind="2H", a=3.32, thickness=3.2, size=(size, size, 1), vacuum=vacuum)
        eps = rng.uniform(-strain, strain, size=2)
        cell = a.cell.array.copy()
        cell[:, :2] *= (1 + eps)[None, :]  # diagonal strain diag(1 + e_x, 1 + e_y, 1)
        a.set_cell(cell, scale_atoms=True)
        a.positions += rng.normal(scale=rattle, size=a.positions.shape)
        selenium = [k for k, s in enumerate(a.symbols) if s == "Se"]
        n_vac = min(int(rng.poisson(mean_vacancies)), len(selenium) - 1)
        if n_vac:
            del a[sorted(rng.choice(selenium, size=n_vac, replace=False).tolist())]
        a.info["se_vacancies"] = n_vac
        out.append(a)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--size", type=int, default=6, help="primitive cells per in-plane direction")
    p.add_argument("--kpts", type=int, default=3, help="k-points per in-plane direction")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    xyz = out / "wse2.extxyz"
    wanted = cells(args.n, args.seed, size=args.size)
    if xyz.exists():  # a rerun: the same cells, perhaps more of them (--n)
        have = read(xyz, ":")
        m = min(len(have), len(wanted))
        if any(
            len(a) != len(b) or not np.allclose(a.positions, b.positions, atol=1e-6)
            for a, b in zip(have[:m], wanted[:m])
        ):
            raise SystemExit(
                f"{xyz} holds other cells than --seed {args.seed} --size {args.size} make; "
                f"use another OUT_DIR or the options it was made with"
            )
        if len(wanted) > len(have):
            tmp = xyz.with_name(xyz.name + ".part")
            write(tmp, wanted, format="extxyz")
            os.replace(tmp, xyz)
            print(f"{xyz}: {len(have)} -> {len(wanted)} cells")
    else:
        tmp = xyz.with_name(xyz.name + ".part")
        write(tmp, wanted, format="extxyz")
        os.replace(tmp, xyz)
    k = str(args.kpts)
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "gpaw_tools.generate",
            str(xyz),
            "-o",
            str(out / "runs"),
            "--h",
            "0.25",
            "--kpts",
            k,
            k,
            "1",
            "--jobs",
            str(args.jobs),
            "--extract",
            str(out / "dataset"),
            "--discard-gpw",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
