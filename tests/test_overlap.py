"""Exact overlap S from the basis functions, against GPAW's own S."""

import numpy as np
import pytest
from ase import Atoms

from ase_gearsh.testing import orbital_rotation
from gpaw_tools.overlap import BasisDataError, OverlapCalculator, SpeciesBasis, species_from_gpaw


def _gpaw_S(path):
    from gpaw import GPAW
    from gpaw.lcao.tools import get_lcao_hamiltonian

    calc = GPAW(str(path), txt=None)
    _, S_kMM = get_lcao_hamiltonian(calc)
    atoms = calc.get_atoms()
    atoms.set_scaled_positions(np.asarray(calc.spos_ac))  # GPAW's wrapped positions
    return atoms, np.asarray(calc.get_ibz_k_points()), S_kMM


@pytest.fixture(scope="module")
def chon():
    return species_from_gpaw(["H", "C", "N", "O"], xc="PBE", basis="szp(dzp)")


def test_overlap_equals_gpaw_molecule(h2o_gpw, chon):
    atoms, _, S_ref = _gpaw_S(h2o_gpw)
    S = OverlapCalculator(chon).overlap(atoms)
    assert S.format == "csr" and S.dtype == np.float64
    assert np.abs(S.toarray() - S_ref[0]).max() < 1e-8
    assert np.abs(S_ref[0]).max() > 0.5  # not trivially small


def test_overlap_equals_gpaw_at_every_kpoint(chain_kpts, chon):
    atoms, kpts, S_ref = _gpaw_S(chain_kpts[0])
    assert len(kpts) > 3 and np.abs(kpts).max() > 0
    S = OverlapCalculator(chon).overlap(atoms, kpts=kpts)
    for Sk, ref in zip(S, S_ref):
        assert np.abs(Sk.toarray() - ref).max() < 1e-8
    assert np.abs(S[1].toarray().imag).max() > 1e-3  # complex phases really applied


def test_species_round_trip_is_exact(h2o_gpw, chon):
    atoms, _, _ = _gpaw_S(h2o_gpw)
    again = {k: SpeciesBasis.from_dict(v.to_dict()) for k, v in chon.items()}
    a = OverlapCalculator(chon).overlap(atoms).toarray()
    b = OverlapCalculator(again).overlap(atoms).toarray()
    assert np.array_equal(a, b)
    assert chon["O"].valence == 6 and chon["O"].n_orbitals == 9 and chon["O"].l == [0, 1, 2]


def test_overlap_is_rotation_covariant(chon):
    """S of a rotated molecule is D^T S D (the rotation rule of the guide)."""
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    a = molecule("CH3OH")
    a.rattle(0.05, seed=1)
    rot = Rotation.random(random_state=4).as_matrix()
    b = a.copy()
    b.positions = a.positions @ rot
    oc = OverlapCalculator(chon)
    S_a = oc.overlap(a).toarray()
    S_b = oc.overlap(b).toarray()
    D = orbital_rotation(rot, [chon[s].l for s in a.get_chemical_symbols()])
    assert np.abs(D.T @ S_a @ D - S_b).max() < 1e-10


def test_unknown_element_and_bad_data(chon):
    with pytest.raises(BasisDataError, match=r"no basis functions for element\(s\) \['Si'\]"):
        OverlapCalculator(chon).overlap(Atoms("SiH", positions=[[0, 0, 0], [0, 0, 1.5]]))
    d = chon["O"].to_dict()
    d["dO"] = np.zeros((2, 2))
    with pytest.raises(BasisDataError, match="dO has shape"):
        SpeciesBasis.from_dict(d)
    with pytest.raises(BasisDataError, match="incomplete basis data"):
        SpeciesBasis.from_dict({"symbol": "O"})


def _random_periodic(seed=3):
    """Small periodic structure, several species, rattled (images in all directions)."""
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.4, cubic=True).repeat((2, 1, 1))
    atoms.set_chemical_symbols(["C", "N", "O", "H"] * 4)
    atoms.rattle(0.2, seed=seed)
    atoms.pbc = (True, True, False)  # one open direction
    atoms.cell[2, 2] += 3.0
    return atoms


def test_overlap_equals_reference_implementation(chon):
    """The fast path equals the previous implementation (benchmarks/_overlap_reference.py)
    on a small periodic structure with four species, at Gamma and k != 0."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "_overlap_reference.py"
    spec = importlib.util.spec_from_file_location("_overlap_reference", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    atoms = _random_periodic()
    kpts = [[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.1, -0.3, 0.0]]
    new, old = OverlapCalculator(chon), ref.OverlapCalculator(chon)
    S, S0 = new.overlap(atoms), old.overlap(atoms)
    assert S.dtype == np.float64 and S.has_sorted_indices
    assert np.abs((S - S0).toarray()).max() < 1e-12
    for Sk, S0k in zip(new.overlap(atoms, kpts=kpts), old.overlap(atoms, kpts=kpts)):
        assert np.abs((Sk - S0k).toarray()).max() < 1e-12
        assert np.abs(Sk - Sk.conj().T).max() < 1e-12
    Sk = new.overlap(atoms, kpts=kpts)
    assert np.abs(Sk[1].toarray().imag).max() > 1e-3
    assert np.abs((Sk[0] - S).toarray()).max() < 1e-14
    # parts: S = O + P^H dO P
    S_p, O, P, dO = new.overlap(atoms, parts=True)
    assert np.abs((O + P.T @ dO @ P - S_p).toarray()).max() < 1e-12


def test_neighbour_fallback_matches(chon, monkeypatch):
    """Without vesin (ASE's neighbour list) S is the same."""
    import builtins

    atoms = _random_periodic(seed=5)
    S = OverlapCalculator(chon).overlap(atoms)
    real_import = builtins.__import__

    def no_vesin(name, *a, **k):
        if name == "vesin":
            raise ImportError("no vesin")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vesin)
    S2 = OverlapCalculator(chon).overlap(atoms)
    assert np.abs((S - S2).toarray()).max() < 1e-14
