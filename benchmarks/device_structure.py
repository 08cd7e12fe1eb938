# ruff: noqa: E501  (long lines: the usage line and a few formulas read better unwrapped)
"""Device-like benchmark structure: amorphous HfO2 (a few Ni on Hf sites) under a 2H-WSe2 monolayer.

    python benchmarks/device_structure.py [--atoms 4000] [--seed 0] [--ni-fraction 0.03] [-o device.extxyz]

Only meant as input for timing benchmarks of the tight-binding model (no DFT, no energy relaxation):

* WSe2: ideal 2H monolayer on a rectangular a x a*sqrt(3) cell (2 formula units), repeated nx x ny.
* HfO2: random packing at a target mass density with hard minimum distances (Hf-O 1.9, O-O 2.4,
  Hf-Hf 3.1 A; Ni counts as Hf), periodic in x, y and between hard walls in z.  Atoms are placed
  by random sequential insertion checked against a grid of cells (O(1) work per candidate).  With
  these distances insertion alone jams near 7-8 g/cm3, below amorphous HfO2 (8.5-9.7 g/cm3), so
  the atoms left when it stalls (~20 % at 9 g/cm3) go to random positions and too-close pairs are
  pushed apart until every minimum distance holds (RuntimeError if that fails: density too high).
* Device: oxide at the bottom, WSe2 `gap` A above the top-most oxide atom, vacuum above; pbc in x, y, z.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers
from ase.io import write
from ase.neighborlist import neighbor_list
from scipy.spatial import cKDTree

SE_HEIGHT = 3.34  # Se-Se distance across the layer; W sits in the midplane
CUT = np.array([[3.1, 1.9], [1.9, 2.4]])  # minimum distances; species 0 = Hf (or Ni), 1 = O
AVOGADRO = 6.02214076e23


def wse2_layer(nx: int, ny: int, a: float = 3.32, z0: float = 0.0) -> Atoms:
    """2H-WSe2 monolayer, rectangular cell (nx*a) x (ny*a*sqrt(3)); Se planes at z0 and z0 + 3.34.

    In-plane W-Se distance a/sqrt(3) and vertical 1.67 give W-Se = 2.54 A (for a = 3.32).
    The cell has 10 A of vacuum above the top Se plane; pbc = (True, True, False).
    """
    b, zw, zt = a * np.sqrt(3), z0 + SE_HEIGHT / 2, z0 + SE_HEIGHT
    unit = Atoms(
        "W2Se4",
        pbc=(True, True, False),
        cell=[a, b, zt + 10.0],
        positions=[
            (0, 0, zw),
            (a / 2, b / 2, zw),
            (a / 2, b / 6, z0),
            (a / 2, b / 6, zt),
            (0, 2 * b / 3, z0),
            (0, 2 * b / 3, zt),
        ],
    )
    return unit.repeat((nx, ny, 1))


def _fu_per_volume(density: float, ni_fraction: float) -> float:
    """HfO2 formula units per A^3 at `density` g/cm3 (Ni counted at its mean fraction on Hf sites)."""
    mass = lambda s: atomic_masses[atomic_numbers[s]]  # noqa: E731
    m_fu = (1 - ni_fraction) * mass("Hf") + ni_fraction * mass("Ni") + 2 * mass("O")
    return density / m_fu * AVOGADRO * 1e-24


def _wrap(d: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Minimum-image difference vectors, periodic in x and y only."""
    d[:, :2] -= np.round(d[:, :2] / box[:2]) * box[:2]
    return d


def _insert(counts, box, rng, batch=512, min_accept=2, anchor=0.9, shell=0.3):
    """Random sequential insertion of counts = (n_Hf, n_O) atoms into `box`, Hf first, then O.

    Cells are at most 1.9/sqrt(3) A wide, so a cell holds at most one atom and a candidate is checked
    against the atoms of a fixed stencil of cells.  Candidates come in batches, a fraction `anchor`
    of them just beyond the minimum distance of a random inserted atom (packs denser than uniform
    candidates); a species is taken as stalled when a batch adds fewer than `min_accept` atoms.
    Returns positions and species (0/1) of the inserted atoms.
    """
    ng = np.ceil(box / (CUT.min() / np.sqrt(3))).astype(int)
    s = box / ng
    r = np.ceil(CUT.max() / s).astype(int)
    st = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in r), indexing="ij"), -1).reshape(-1, 3)
    st = st[((np.maximum(np.abs(st) - 1, 0) * s) ** 2).sum(1) < CUT.max() ** 2]  # reachable cells
    grid = np.full((ng[0], ng[1], ng[2] + 2 * r[2]), -1)  # atom index per cell, padded in z
    need = np.array(counts)
    pos, typ, n = np.zeros((need.sum(), 3)), np.zeros(need.sum(), int), 0
    for sp in (0, 1):
        while need[sp]:
            P = rng.random((batch, 3)) * box
            if n:
                m = np.flatnonzero(rng.random(batch) < anchor)
                a, v = rng.integers(0, n, len(m)), rng.normal(size=(len(m), 3))
                v *= ((CUT[sp, typ[a]] + shell * rng.random(len(m))) / np.linalg.norm(v, axis=1))[
                    :, None
                ]
                P[m] = pos[a] + v
                P[:, :2] %= box[:2]
                P[:, 2] = np.clip(P[:, 2], 0.0, box[2])
            c = np.minimum((P / s).astype(int), ng - 1)
            nb = c[:, None, :] + st
            idx = grid[nb[..., 0] % ng[0], nb[..., 1] % ng[1], nb[..., 2] + r[2]]
            i, k = np.nonzero(idx >= 0)
            j = idx[i, k]  # (candidate, stored atom) pairs in reachable cells
            d = _wrap(pos[j] - P[i], box)
            bad = np.zeros(batch, bool)
            bad[i[np.einsum("ij,ij->i", d, d) < CUT[sp, typ[j]] ** 2]] = True
            acc = []  # survivors must also keep apart from each other
            for q in np.flatnonzero(~bad):
                dq = _wrap(P[acc] - P[q], box)
                if (
                    len(acc) < need[sp]
                    and not (np.einsum("ij,ij->i", dq, dq) < CUT[sp, sp] ** 2).any()
                ):
                    acc.append(q)
            need[sp] -= len(acc)
            new = np.arange(n, n + len(acc))
            pos[new], typ[new], n = P[acc], sp, n + len(acc)
            grid[c[acc, 0], c[acc, 1], c[acc, 2] + r[2]] = new
            if len(acc) < min_accept:  # stalled
                break
    return pos[:n], typ[:n]


def _separate(pos, typ, box, max_iter=500, margin=0.01):
    """Push apart every pair closer than its minimum distance (each atom by half the overlap,
    plus `margin`), z clipped to the slab, until no pair is too close.  Returns the sweep count."""
    size = np.array([box[0], box[1], box[2] + 2 * CUT.max() + 1.0])  # no wrap in z
    for sweep in range(max_iter):
        pos[:, :2] %= box[:2]
        pos[:, :2] = np.minimum(pos[:, :2], np.nextafter(box[:2], 0))
        pairs = cKDTree(pos, boxsize=size).query_pairs(CUT.max(), output_type="ndarray")
        d = _wrap(pos[pairs[:, 1]] - pos[pairs[:, 0]], box)
        dist = np.linalg.norm(d, axis=1)
        cut = CUT[typ[pairs[:, 0]], typ[pairs[:, 1]]]
        v = dist < cut
        if not v.any():
            return sweep
        shift = (0.5 * (cut[v] + margin - dist[v]) / np.maximum(dist[v], 1e-6))[:, None] * d[v]
        np.add.at(pos, pairs[v, 1], shift)
        np.add.at(pos, pairs[v, 0], -shift)
        pos[:, 2] = np.clip(pos[:, 2], 0.0, box[2])
    raise RuntimeError(
        f"cannot reach the requested density: {v.sum()} pairs still violate the "
        f"minimum distances after {max_iter} sweeps; lower the density"
    )


def amorphous_hfo2(
    cell_xy: tuple[float, float],
    thickness: float,
    density: float = 9.0,
    ni_fraction: float = 0.03,
    seed: int = 0,
    z0: float = 0.0,
) -> Atoms:
    """Random Hf:O = 1:2 packing of a cell_xy[0] x cell_xy[1] x thickness box at `density` g/cm3.

    Atoms lie in z0 <= z <= z0 + thickness; cell z = z0 + thickness, pbc = (True, True, False).
    round(ni_fraction * n_Hf) random Hf (at least one if ni_fraction > 0) are then replaced by Ni.
    Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    box = np.array([cell_xy[0], cell_xy[1], thickness], float)
    n_hf = max(1, int(round(_fu_per_volume(density, ni_fraction) * box.prod())))
    pos, typ = _insert((n_hf, 2 * n_hf), box, rng)
    left = np.array([n_hf - (typ == 0).sum(), 2 * n_hf - (typ == 1).sum()])
    if left.any():  # insertion stalled: random positions for the rest, then remove the overlaps
        pos = np.vstack([pos, rng.random((left.sum(), 3)) * box])
        typ = np.concatenate([typ, np.repeat([0, 1], left)])
        _separate(pos, typ, box)
    symbols = np.where(typ == 0, "Hf", "O").astype(object)  # Ni: random Hf sites
    n_ni = min(n_hf, max(1, round(ni_fraction * n_hf))) if ni_fraction > 0 else 0
    symbols[rng.choice(np.flatnonzero(typ == 0), n_ni, replace=False)] = "Ni"
    return Atoms(
        symbols=list(symbols),
        positions=pos + [0.0, 0.0, z0],
        cell=[box[0], box[1], z0 + thickness],
        pbc=(True, True, False),
    )


def build_device(
    n_atoms: int = 4000,
    seed: int = 0,
    ni_fraction: float = 0.03,
    vacuum: float = 8.0,
    gap: float = 3.0,
) -> Atoms:
    """HfO2:Ni slab (9.0 g/cm3) under 2H-WSe2, about n_atoms atoms (within a few atoms).

    The lateral size L solves sigma*L^2 + rho*L^3/2 = n_atoms (slab about L/2 thick); the
    WSe2 supercell is made as square as possible and the oxide thickness takes up the rest.
    """
    a, density = 3.32, 9.0
    b = a * np.sqrt(3)
    fu = _fu_per_volume(density, ni_fraction)
    roots = np.roots([1.5 * fu, 6 / (a * b), 0.0, -n_atoms])
    L = max(x.real for x in roots if abs(x.imag) < 1e-9)
    ny = max(1, round(L / b))
    nx = max(1, round(ny * b / a))  # as square as possible
    n_fu = round((n_atoms - 6 * nx * ny) / 3)
    if n_fu < 1:
        raise ValueError(f"n_atoms = {n_atoms} is too small for a WSe2 + HfO2 device")
    thickness = n_fu / (fu * nx * a * ny * b)
    atoms = amorphous_hfo2((nx * a, ny * b), thickness, density, ni_fraction, seed)
    z_top = atoms.positions[:, 2].max()
    atoms += wse2_layer(nx, ny, a, z0=z_top + gap)
    atoms.set_cell([nx * a, ny * b, z_top + gap + SE_HEIGHT + vacuum])
    atoms.pbc = True
    desc = (
        f"amorphous HfO2:Ni ({density} g/cm3, {thickness:.2f} A) under 2H-WSe2 "
        f"({nx}x{ny} rectangular cells), gap {gap} A, vacuum {vacuum} A"
    )
    atoms.info = {"description": desc, "seed": seed}
    return atoms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=4000, help="target number of atoms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ni-fraction", type=float, default=0.03, help="fraction of Hf replaced by Ni")
    p.add_argument("-o", "--output", default="device.extxyz")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    atoms = build_device(args.atoms, args.seed, args.ni_fraction)
    elapsed = time.perf_counter() - t0
    oxide = atoms[[s in ("Hf", "O", "Ni") for s in atoms.get_chemical_symbols()]]
    z = oxide.positions[:, 2]
    volume = atoms.cell[0, 0] * atoms.cell[1, 1] * np.ptp(z) * 1e-24  # cm^3
    print(f"atoms       {len(atoms)} (target {args.atoms})")
    print("composition", dict(sorted(Counter(atoms.get_chemical_symbols()).items())))
    print("cell (A)    ", np.round(atoms.cell.lengths(), 3).tolist())
    print(
        f"oxide       {oxide.get_masses().sum() / AVOGADRO / volume:.3f} g/cm3, {np.ptp(z):.2f} A thick"
    )
    print(f"min dist    {neighbor_list('d', atoms, 3.5).min():.3f} A")
    print(f"time        {elapsed:.2f} s")

    tmp = f"{args.output}.tmp{os.getpid()}"  # same directory, so os.replace is atomic
    write(tmp, atoms, format="extxyz")
    os.replace(tmp, args.output)
    print("wrote      ", args.output)


if __name__ == "__main__":
    main()
