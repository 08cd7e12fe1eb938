"""The paper's device workflow at small scale: a model trained on small cells
predicts a large defective sheet; species-projected DOS; hole concentration.

    python tutorials/device_workflow.py --model RUN/model.ckpt --cell cell.extxyz \
        --repeat 24 --vacancies 4 --vacancy-species N --species B,N -o tutorial-output

Steps (see tutorials/03_device_workflow.md):

1. builds a large structure from a small cell of the training data (repeated
   ``--repeat`` times in-plane, ``--vacancies`` random vacancies, a little
   strain and rattle) -- or reads any ``--structure`` file (e.g. a HfO2/WSe2
   interface from benchmarks/device_structure.py for a W/Se/Hf/O/Ni model);
2. predicts H and the exact S with ``GearsHCalculator``;
3. species-projected DOS (dense up to 20000 orbitals, kernel polynomial method
   beyond), plotted around E_F;
4. "hole concentration" as in the paper: the DOS projected on ``--species``
   integrated from E_F to E_F + 0.2 eV (states per spin, times 2 for both
   spins), per cell area.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def large_sheet(
    cell_atoms,
    repeat: int,
    vacancies: int,
    strain: float,
    rattle: float,
    seed: int,
    vacancy_species=None,
):
    rng = np.random.default_rng(seed)
    atoms = cell_atoms.repeat((repeat, repeat, 1))
    if vacancies:
        pool = [
            k
            for k, s in enumerate(atoms.symbols)
            if vacancy_species is None or s == vacancy_species
        ]
        del atoms[sorted(rng.choice(pool, vacancies, replace=False).tolist())]
    atoms.set_cell(atoms.cell * [1 + strain, 1 + strain, 1], scale_atoms=True)
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    return atoms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--structure", help="any ase.io file; default: built from --cell")
    p.add_argument("--cell", help="small training cell to repeat (ase.io file)")
    p.add_argument("--repeat", type=int, default=18)
    p.add_argument("--vacancies", type=int, default=3)
    p.add_argument("--vacancy-species", help="only remove atoms of this element")
    p.add_argument("--strain", type=float, default=0.01)
    p.add_argument("--rattle", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--species", default="W,Se", help="species of the hole concentration")
    p.add_argument("--window", type=float, default=0.2, help="eV above E_F")
    p.add_argument("--width", type=float, default=0.05, help="DOS broadening, eV")
    p.add_argument("-o", "--output", default="tutorial-output")
    a = p.parse_args(argv)
    from ase.io import read, write

    from ase_gearsh import GearsHCalculator
    from ase_gearsh.predict import plot_dos

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    if a.structure:
        atoms = read(a.structure)
    else:
        atoms = large_sheet(
            read(a.cell), a.repeat, a.vacancies, a.strain, a.rattle, a.seed, a.vacancy_species
        )
    write(out / "structure.extxyz", atoms)
    print(
        f"structure: {len(atoms)} atoms, {atoms.get_chemical_formula()}, cell "
        f"{atoms.cell.lengths().round(2).tolist()} A"
    )

    atoms.calc = GearsHCalculator(a.model, progress=True)
    t0 = time.perf_counter()
    atoms.calc.get_hamiltonian()  # predicted H and exact S, timed together
    atoms.calc.get_overlap()
    t1 = time.perf_counter()
    pb = atoms.calc.blocks()
    print(
        f"H ({pb.n_orbitals} orbitals, {len(pb.pair_i)} bonds) and S in {t1 - t0:.1f} s "
        f"(network {pb.timings['atoms'] + pb.timings['bonds']:.1f} s)"
    )
    e, pdos = atoms.calc.get_pdos(width=a.width, npts=4001)
    e, dos = atoms.calc.get_dos(width=a.width, npts=4001)
    ef = atoms.calc.get_fermi_level()
    t2 = time.perf_counter()
    print(f"spectrum, PDOS and E_F = {ef:.3f} eV in {t2 - t1:.1f} s")
    species = [s for s in a.species.split(",") if s]
    missing = sorted(set(species) - set(pdos))
    if missing:
        raise SystemExit(f"--species {missing} not in the structure ({sorted(pdos)})")
    proj = sum(pdos[s] for s in species)
    win = (e >= ef) & (e <= ef + a.window)
    holes = 2.0 * float(np.trapezoid(proj[win], e[win]))  # both spins
    area = float(np.linalg.norm(np.cross(atoms.cell[0], atoms.cell[1])))
    print(
        f"{'+'.join(species)}-projected states in [E_F, E_F + {a.window} eV]: {holes:.4f} "
        f"per cell = {holes / area * 1e16:.3e} cm^-2 (cell area {area:.1f} A^2)"
    )
    view = (e > ef - 6) & (e < ef + 6)
    plot_dos(
        out / "pdos.png",
        e[view],
        dos[view],
        {s: pdos[s][view] for s in pdos},
        ef,
        title=f"{atoms.get_chemical_formula()} ({len(atoms)} atoms): species-projected DOS",
    )
    summary = {
        "atoms": len(atoms),
        "orbitals": pb.n_orbitals,
        "fermi_level_eV": ef,
        "hole_species": species,
        "window_eV": a.window,
        "holes_per_cell": holes,
        "holes_per_cm2": holes / area * 1e16,
        "seconds": {"H_and_S": t1 - t0, "spectrum": t2 - t1},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}/pdos.png, {out}/structure.extxyz, {out}/summary.json")


if __name__ == "__main__":
    main()
