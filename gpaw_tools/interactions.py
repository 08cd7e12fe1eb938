"""Which atom pairs (i, j, R) can carry a non-zero LCAO Hamiltonian block.

In PAW-LCAO the Hamiltonian element between basis functions on atoms i and j
(j displaced by the lattice vector R) has two sources:

* two-centre terms (kinetic energy, the local potential on the grid and the
  overlap): non-zero only if the basis spheres overlap,
  ``d_ij(R) < rc_i + rc_j``;
* PAW projector terms ``sum_a <phi_i|p_a> dH_a <p_a|phi_j>`` (and the same
  with ``dO_a`` in S): non-zero only if some atom ``a`` has projectors
  overlapping both functions, which needs ``d_ij < rc_i + rc_j + 2 rp_a``.

H and S therefore reach further than the basis spheres.  This module derives the exact set of
possibly non-zero blocks from the geometry and checks whether a Gamma-centred
k-point grid (``(1, 1, 1)`` for a Gamma-only run) can resolve every block
without aliasing.  Only numpy and ASE are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

from ase_gearsh.core.errors import GearsHError


class AliasingError(GearsHError, ValueError):
    """The periodic images of an atom pair cannot be told apart by the k-grid."""


@dataclass(frozen=True)
class Interactions:
    """Unordered atom pairs with possibly non-zero H blocks.

    Every off-site block is listed once, in canonical orientation: ``i < j``,
    or ``i == j`` with a lattice shift ``R`` that is lexicographically positive.
    The omitted partner is ``H_ji(-R) = H_ij(R)^T``.  On-site blocks
    ``(i, i, 0)`` are not listed here.
    """

    ij: np.ndarray  # (P, 2) int
    shift: np.ndarray  # (P, 3) int, R in units of the cell vectors
    vector: np.ndarray  # (P, 3) float, r_j + R @ cell - r_i, Angstrom
    two_centre: np.ndarray  # (P,) bool, True if the basis spheres overlap

    def __len__(self) -> int:
        return len(self.ij)


def _canonical(i, j, S):
    """Map directed (i, j, S) to the canonical unordered orientation."""
    i = np.asarray(i)
    j = np.asarray(j)
    S = np.asarray(S).reshape(-1, 3)
    # lexicographic sign of S: first non-zero component
    nz = S != 0
    first = np.where(nz.any(axis=1), nz.argmax(axis=1), 0)
    sign = np.sign(S[np.arange(len(S)), first])
    flip = (i > j) | ((i == j) & (sign < 0))
    ci = np.where(flip, j, i)
    cj = np.where(flip, i, j)
    cS = np.where(flip[:, None], -S, S)
    keep = ~((ci == cj) & ~nz.any(axis=1))  # drop on-site (i, i, 0)
    return ci[keep], cj[keep], cS[keep]


def interaction_radii(basis_rc, projector_rc) -> np.ndarray:
    """Per-atom radii whose pairwise sums bound the range of H and S.

    ``rc_i + rc_j + 2 max_a(rp_a)`` bounds every two- and three-centre term.
    """
    basis_rc = np.asarray(basis_rc, dtype=float)
    projector_rc = np.asarray(projector_rc, dtype=float)
    if basis_rc.shape != projector_rc.shape or basis_rc.ndim != 1:
        raise ValueError(
            f"expected one basis and one projector radius per atom, got shapes "
            f"{basis_rc.shape} and {projector_rc.shape}"
        )
    return basis_rc + (projector_rc.max() if len(projector_rc) else 0.0)


def find_interactions(atoms: Atoms, basis_rc, projector_rc) -> Interactions:
    """All unordered pairs (i, j, R) whose H or S block may be non-zero.

    ``basis_rc`` and ``projector_rc`` are per-atom radii in Angstrom (largest
    basis-function cut-off and largest projector cut-off of each atom).  A pair
    is kept when ``d_ij(R) < rc_i + rc_j + 2 max(rp)``: this bounds every
    three-centre projector term.  The bound is measured to hold on GPAW data
    (tests/test_extract_kpoints.py).
    """
    if len(basis_rc) != len(atoms):
        raise ValueError(f"expected {len(atoms)} basis radii, got {len(basis_rc)}")
    radii = interaction_radii(basis_rc, projector_rc)
    i, j, S = neighbor_list("ijS", atoms, cutoff=radii, self_interaction=False)
    ci, cj, cS = _canonical(i, j, S)
    key = np.unique(np.column_stack([ci, cj, cS]).astype(np.int64), axis=0)
    ci, cj, cS = key[:, 0], key[:, 1], key[:, 2:5]
    vec = atoms.positions[cj] + cS @ np.asarray(atoms.cell) - atoms.positions[ci]
    dist = np.linalg.norm(vec, axis=1)
    basis_rc = np.asarray(basis_rc, dtype=float)
    two = dist < basis_rc[ci] + basis_rc[cj]
    return Interactions(
        ij=np.column_stack([ci, cj]).astype(np.int32),
        shift=cS.astype(np.int32),
        vector=vec,
        two_centre=two,
    )


def _pair_images(inter: Interactions):
    """Per unordered atom pair: the key (i, j), its lattice shifts and vectors.

    For i == j the mirrored shifts -R and the on-site R = 0 are added: they
    are separate blocks of the same matrix element that must not alias.
    """
    i, j = inter.ij[:, 0], inter.ij[:, 1]
    for key in np.unique(inter.ij, axis=0):
        sel = (i == key[0]) & (j == key[1])
        R, vec = inter.shift[sel], inter.vector[sel]
        if key[0] == key[1]:
            R = np.concatenate([R, -R, np.zeros((1, 3), int)])
            vec = np.concatenate([vec, -vec, np.zeros((1, 3))])
        yield key, R, vec


def required_grid(inter: Interactions, pbc) -> np.ndarray:
    """Smallest Gamma-centred grid that separates every pair's images.

    The lattice shifts of all interacting images of a pair must be distinct
    modulo the grid; a grid larger than the spread of shifts is sufficient.
    """
    need = np.ones(3, dtype=int)
    for _, R, _ in _pair_images(inter):
        need = np.maximum(need, R.max(axis=0) - R.min(axis=0) + 1)
    need[~np.asarray(pbc, bool)] = 1
    return need


def check_aliasing(atoms: Atoms, inter: Interactions, grid, basis_rc, projector_rc):
    """Raise :class:`AliasingError` if the grid cannot resolve all blocks.

    ``grid`` is the Gamma-centred k-point grid of the run (``(1, 1, 1)`` for a
    Gamma-only run, where every atom must see at most one image of any other).
    """
    grid = np.asarray(grid, dtype=int)
    for key, R, vec in _pair_images(inter):
        folded = np.mod(R, grid)
        _, inverse, counts = np.unique(folded, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        if (counts == 1).all():
            continue
        a, b = np.flatnonzero(inverse == np.flatnonzero(counts > 1)[0])[:2]
        sym = atoms.get_chemical_symbols()
        need = required_grid(inter, atoms.pbc)
        radii = interaction_radii(basis_rc, projector_rc)
        reach = radii[key[0]] + radii[key[1]]
        lengths = atoms.cell.lengths()
        grid_t = tuple(int(x) for x in grid)
        if (grid == 1).all():
            advice = (
                "Gamma-only data needs every atom to see at most one image of "
                "any other atom within the range of H. Use a supercell repeated "
                f"{tuple(int(x) for x in need)} times (cell lengths >= "
                f"{tuple(round(float(x), 2) for x in need * lengths)} A) or a "
                f"k-sampled run with a Gamma-centred grid of at least "
                f"{tuple(int(x) for x in need)} and symmetry='off'."
            )
        else:
            advice = (
                f"the k-point grid {grid_t} is too coarse for the range of H; use "
                f"a Gamma-centred grid of at least "
                f"{tuple(int(x) for x in np.maximum(need, grid))}."
            )
        raise AliasingError(
            f"atoms {key[0]} ({sym[key[0]]}) and {key[1]} ({sym[key[1]]}) interact "
            f"through two periodic images that the k-grid {grid_t} cannot separate: "
            f"shift {tuple(int(x) for x in R[a])} at {np.linalg.norm(vec[a]):.3f} A and "
            f"shift {tuple(int(x) for x in R[b])} at {np.linalg.norm(vec[b]):.3f} A "
            f"(H can reach up to {reach:.2f} A for this pair through PAW projectors). "
            f"{advice}"
        )
