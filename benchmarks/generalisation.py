"""Generalisation: models trained on the five benchmark molecules, tested on other
C/H/N/O molecules (same elements, molecules never in training).

    python benchmarks/generalisation.py MODEL [MODEL ...] [--data /work/bench/newmol]

Makes (once, resumable) two rattled, rotated snapshots of each of six g2 molecules
outside the training set (methanol, acetic acid, methylamine, pyridine,
acetaldehyde, methyl nitrite) with ``make_molecules.py --names`` and GPAW LCAO at
the training settings, then evaluates every model on them exactly as ``gearsh
eval`` does and prints H MAE and eigenvalue MAE (E_F +- 5 eV) per molecule and
overall (a committee: also its members' spread).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ase.io import read

HERE = Path(__file__).parent
NEW = ["CH3OH", "CH3COOH", "H3CNH2", "C5H5N", "CH3CHO", "CH3ONO"]
PER_MOLECULE = 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--data", default="/work/bench/newmol")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args(argv)
    data = Path(args.data)
    cmd = [sys.executable, str(HERE / "make_molecules.py"), str(data), "--per-molecule"]
    cmd += [str(PER_MOLECULE), "--seed", "99", "--jobs", str(args.jobs), "--names", *NEW]
    if subprocess.call(cmd) != 0:
        return 1

    from ase_gearsh.model.engine import enable_compilation_cache
    from ase_gearsh.training.evaluate import evaluate

    enable_compilation_cache()
    formulas = [a.get_chemical_formula() for a in read(data / "molecules.extxyz", ":")]
    names = [n for n in NEW for _ in range(PER_MOLECULE)]
    for model in args.models:
        s = evaluate(model, data / "dataset", progress=False)
        per = {}
        for row in s["per_structure"]:
            k = int(row["name"].split("-")[-1].split(".")[0])
            per.setdefault(names[k], []).append(row)
        print(f"\n{model}: {s['structures']} structures of molecules outside its training set")
        spread = "committee_spread_meV" in s  # a committee: its members' spread too
        head = f"  {'molecule':10s} {'formula':9s} {'H MAE meV':>10s} {'eig MAE meV':>12s}"
        print(head + (f" {'spread meV':>11s}" if spread else ""))
        for name, rows in per.items():
            k = NEW.index(name) * PER_MOLECULE
            h = sum(r["h_mae_meV"] for r in rows) / len(rows)
            e = sum(r["eig_mae_window_meV"] for r in rows) / len(rows)
            line = f"  {name:10s} {formulas[k]:9s} {h:10.1f} {e:12.1f}"
            if spread:
                line += f" {sum(r['committee_spread_meV'] for r in rows) / len(rows):11.2f}"
            print(line)
        print(
            f"  all: H MAE {s['h_mae_meV']:.1f} meV (on-site {s['h_mae_onsite_meV']:.1f}, "
            f"pairs {s['h_mae_pair_meV']:.1f}); eigenvalue MAE within E_F +- 5 eV "
            f"{s['eig_mae_window_meV']:.1f} meV"
        )
        if spread:
            print(
                f"  committee spread {s['committee_spread_meV']:.2f} meV (Spearman with the "
                f"H MAE over the structures {s['committee_spread_spearman']:+.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
