"""Write tests/data/golden_molecules_ethanol.npz: the shipped model's H of one
rattled ethanol.  Re-run only when models/molecules.ckpt is replaced on purpose.

The stored file was written for the committee of two models (two-centre baseline, two
TensorDenses, 24 features; models/README.md) by this script, right after the committee
was written there."""

from pathlib import Path

import numpy as np
from ase.build import molecule

from ase_gearsh.model.engine import Model
from ase_gearsh.model.inference import Predictor

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    model = Model.from_checkpoint(ROOT / "models" / "molecules.ckpt")
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    H = Predictor(model)(atoms).matrix(sparse=False)
    np.savez_compressed(
        ROOT / "tests" / "data" / "golden_molecules_ethanol.npz",
        numbers=atoms.numbers,
        positions=atoms.positions,
        H=H,
    )
    print(f"H {H.shape}, max |H| {np.abs(H).max():.3f} eV")
