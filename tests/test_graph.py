"""The model's neighbour lists: vesin (when installed) and ASE give the same directed
pairs in the same order, so the graph does not depend on which one ran."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule, mx2
from ase.neighborlist import neighbor_list

from ase_gearsh.model.graph import build_graph, directed_pairs

pytest.importorskip("vesin")


def structures():
    wire = molecule("H2O")
    wire.center(vacuum=2.0)
    wire.pbc = [True, False, False]
    shifted = bulk("Si", "diamond", 5.43, cubic=True)
    shifted.positions += [7.1, -3.3, 12.0]  # outside the cell: wrapped by both
    shifted.rattle(0.1, seed=1)
    return {
        "molecule, no cell": molecule("CH3CH2OH"),
        "small fcc cell, many images": bulk("Cu", "fcc", 3.6),
        "WSe2 slab (periodic in plane)": mx2("WSe2", a=3.32, size=(2, 2, 1), vacuum=5.0),
        "wire": wire,
        "atoms outside the cell": shifted,
        "one atom": Atoms("H", positions=[[0.0, 0.0, 0.0]]),
    }


@pytest.mark.parametrize("name", list(structures()))
def test_vesin_and_ase_give_the_same_pairs_in_the_same_order(name, monkeypatch):
    atoms = structures()[name]
    rmax = 6.5
    fast = directed_pairs(atoms, rmax)
    monkeypatch.setitem(sys.modules, "vesin", None)  # import fails: the ASE path
    slow = directed_pairs(atoms, rmax)
    for a, b in zip(fast[:3], slow[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fast[3], slow[3], atol=1e-12)
    # and both are ASE's own list, reordered
    i, j, S, D = neighbor_list("ijSD", atoms, rmax, self_interaction=False)
    assert len(i) == len(fast[0])
    key = lambda i, j, S: sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))  # noqa: E731
    assert key(i, j, S) == key(*fast[:3])
    fi, fj, fS, fD = fast
    pos = atoms.positions
    np.testing.assert_allclose(fD, pos[fj] - pos[fi] + fS @ atoms.cell.array, atol=1e-10)
    d = np.linalg.norm(fD, axis=1)
    assert np.all(d < rmax) and np.all(d > 0)


def test_graphs_from_both_lists_are_equal(monkeypatch):
    atoms = mx2("WSe2", a=3.32, size=(2, 2, 1), vacuum=5.0)
    species = np.array([0 if s == "W" else 1 for s in atoms.get_chemical_symbols()])
    pc = np.array([[6.0, 6.5], [6.5, 7.0]])
    g1 = build_graph(atoms, species, 5.0, pc)
    monkeypatch.setitem(sys.modules, "vesin", None)
    g2 = build_graph(atoms, species, 5.0, pc)
    for f in ("edge_i", "edge_j", "edge_vec", "pair_i", "pair_j", "pair_shift", "pair_vec"):
        np.testing.assert_array_equal(getattr(g1, f), getattr(g2, f), err_msg=f)
    assert len(g1.edge_i) > 0 and len(g1.pair_i) > 0


def far_apart():
    """A water molecule with one H 3e6 A away: vesin 0.6 stops the process with a
    floating point exception on such spans (measured), so ASE's list is used."""
    atoms = molecule("H2O")
    atoms.positions[1] = [3e6, 0.0, 0.0]
    return atoms


def test_structures_vesin_cannot_take_go_to_ase():
    from ase_gearsh.core.neighbours import VESIN_MAX_BINS, vesin_neighbor_list

    normal = mx2("WSe2", a=3.32, size=(8, 8, 1), vacuum=5.0)
    assert vesin_neighbor_list(normal, 8.0) is not None
    assert vesin_neighbor_list(far_apart(), 6.5) is None  # 3e6 / 6.5 bins
    line = Atoms("H2", positions=[[0, 0, 0], [VESIN_MAX_BINS * 5.0, 0, 0]])
    assert vesin_neighbor_list(line, 5.0) is None
    line.positions[1, 0] = 0.5 * VESIN_MAX_BINS * 5.0
    assert vesin_neighbor_list(line, 5.0) is not None
    bad = molecule("H2O")
    bad.positions[0, 0] = np.nan
    assert vesin_neighbor_list(bad, 5.0) is None
    # an atom 3e9 cells out of a periodic cell: vesin loses its pair (int32 cell index)
    h2 = Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]], cell=[5, 5, 5], pbc=True)
    assert vesin_neighbor_list(h2, 3.0) is not None
    h2.positions[1, 0] += 3e9 * 5.0
    assert vesin_neighbor_list(h2, 3.0) is None
    assert len(directed_pairs(h2, 3.0)[0]) == 2
    # the far-apart structure's list: ASE's (the O-H pair only), in the fixed order
    i, j, S, D = directed_pairs(far_apart(), 6.5)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (2, 0)]
    np.testing.assert_array_equal(S, 0)
