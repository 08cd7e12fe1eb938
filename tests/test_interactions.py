"""Geometry of the H range and the aliasing check (no GPAW needed)."""

import numpy as np
import pytest
from ase import Atoms

from gpaw_tools.interactions import AliasingError, check_aliasing, find_interactions, required_grid


def dimer(length):
    return Atoms(
        "H2",
        positions=[[0, 0, 0], [0.3, 0.2, 0.8]],
        cell=[10, 10, length],
        pbc=[False, False, True],
    )


def test_canonical_unordered_pairs():
    a = dimer(4.5)
    inter = find_interactions(a, [2.0, 2.0], [0.5, 0.5])
    assert (inter.ij[:, 0] <= inter.ij[:, 1]).all()
    # on-site (i, i, 0) is never listed; self-image pairs only with positive R
    self_pairs = inter.ij[:, 0] == inter.ij[:, 1]
    assert (inter.shift[self_pairs][:, 2] > 0).all()
    np.testing.assert_allclose(
        inter.vector,
        a.positions[inter.ij[:, 1]] + inter.shift @ a.cell.array - a.positions[inter.ij[:, 0]],
    )
    d = np.linalg.norm(inter.vector, axis=1)
    assert d.max() < 2 * (2.0 + 0.5)
    # projector reach: pairs beyond the basis spheres are kept but flagged
    assert (~inter.two_centre).any() and (d[~inter.two_centre] >= 4.0).all()


def test_aliasing_detected_and_grid_advised():
    a = dimer(3.0)
    inter = find_interactions(a, [2.0, 2.0], [0.5, 0.5])
    need = required_grid(inter, a.pbc)
    assert need[0] == need[1] == 1 and need[2] > 1
    with pytest.raises(AliasingError, match="supercell repeated"):
        check_aliasing(a, inter, (1, 1, 1), [2.0, 2.0], [0.5, 0.5])
    with pytest.raises(AliasingError, match="too coarse"):
        check_aliasing(a, inter, (1, 1, need[2] - 1), [2.0, 2.0], [0.5, 0.5])
    check_aliasing(a, inter, need, [2.0, 2.0], [0.5, 0.5])  # no error


def test_large_cell_is_neighbour_unique():
    a = dimer(30.0)
    inter = find_interactions(a, [2.0, 2.0], [0.5, 0.5])
    check_aliasing(a, inter, (1, 1, 1), [2.0, 2.0], [0.5, 0.5])
    assert inter.ij.tolist() == [[0, 1]]


def test_radius_count_mismatch():
    with pytest.raises(ValueError, match="expected 2 basis radii, got 1"):
        find_interactions(dimer(3.0), [2.0], [0.5])
