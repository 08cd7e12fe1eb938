"""Reproducible sample structures (used by the benchmarks and the demo)."""

from __future__ import annotations

import numpy as np
from ase.build import molecule

__all__ = ["MOLECULES", "molecule_snapshots"]

# C, H, N, O: alcohol, amide, nitro group, aromatic heterocycle, acid.
MOLECULES = ["CH3CH2OH", "CH3CONH2", "CH3NO2", "C4H4NH", "HCOOH"]


def molecule_snapshots(per_molecule: int, rattle: float, seed: int, names=MOLECULES):
    """Gaussian-rattled (``rattle`` A), randomly rotated copies of ``names``."""
    rng = np.random.default_rng(seed)
    images = []
    for name in names:
        for _ in range(per_molecule):
            atoms = molecule(name)
            atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
            q = rng.normal(size=4)
            q /= np.linalg.norm(q)
            a, b, c, d = q
            rot = np.array(
                [
                    [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
                ]
            )
            atoms.positions = atoms.positions @ rot.T
            atoms.info["molecule"] = name
            images.append(atoms)
    return images
