"""Exact overlap S from the basis functions, against GPAW's own S."""

import importlib.util
from pathlib import Path

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


HAVE_NUMBA = importlib.util.find_spec("numba") is not None
ENGINES = [
    pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")),
    "numpy",
]


def _reference_module():
    """The implementation before the sparse layouts (benchmarks/_overlap_reference.py)."""
    path = Path(__file__).parents[1] / "benchmarks" / "_overlap_reference.py"
    spec = importlib.util.spec_from_file_location("_overlap_reference", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    return ref


def _check_csr(S):
    """Canonical CSR: sorted column indices, no duplicates, no explicit zeros."""
    assert S.format == "csr" and S.has_sorted_indices
    S.check_format(full_check=True)
    cols = np.split(S.indices, S.indptr[1:-1])
    assert all((np.diff(c) > 0).all() for c in cols)
    assert (S.data != 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_overlap_equals_gpaw_molecule(h2o_gpw, chon, engine):
    atoms, _, S_ref = _gpaw_S(h2o_gpw)
    S = OverlapCalculator(chon, engine=engine).overlap(atoms)
    assert S.format == "csr" and S.dtype == np.float64
    assert np.abs(S.toarray() - S_ref[0]).max() < 1e-14
    assert np.abs(S_ref[0]).max() > 0.5  # not trivially small
    _check_csr(S)


@pytest.mark.parametrize("engine", ENGINES)
def test_overlap_equals_gpaw_at_every_kpoint(chain_kpts, chon, engine):
    atoms, kpts, S_ref = _gpaw_S(chain_kpts[0])
    assert len(kpts) > 3 and np.abs(kpts).max() > 0
    S = OverlapCalculator(chon, engine=engine).overlap(atoms, kpts=kpts)
    for Sk, ref in zip(S, S_ref):
        assert np.abs(Sk.toarray() - ref).max() < 1e-14
        _check_csr(Sk)
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


@pytest.mark.parametrize("engine", ENGINES)
def test_overlap_equals_reference_implementation(chon, engine):
    """Both engines equal the previous implementation (benchmarks/_overlap_reference.py)
    on a small periodic structure with four species, at Gamma and k != 0."""
    ref = _reference_module()
    atoms = _random_periodic()
    kpts = [[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.1, -0.3, 0.0]]
    new, old = OverlapCalculator(chon, engine=engine), ref.OverlapCalculator(chon)
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


def _device_piece(seed=0, n=28):
    """Random periodic piece of the device (Hf, O, Ni, W, Se; 2 A apart, open in z):
    species with many radial functions of very different reach."""
    rng = np.random.default_rng(seed)
    cell = np.diag([8.0, 7.0, 12.0])
    pos = []
    while len(pos) < n:
        p = rng.random(3) * [8.0, 7.0, 7.0]
        d = np.array(pos) - p if pos else np.zeros((0, 3))
        d[:, :2] -= np.round(d[:, :2] / [8.0, 7.0]) * [8.0, 7.0]
        if not len(d) or np.linalg.norm(d, axis=1).min() > 2.0:
            pos.append(p)
    symbols = rng.choice(["Hf", "O", "O", "Ni", "W", "Se"], n)
    return Atoms(symbols, positions=pos, cell=cell, pbc=(True, True, False))


@pytest.fixture(scope="module")
def device_species():
    return species_from_gpaw(["O", "Ni", "Se", "Hf", "W"], xc="PBE", basis="szp(dzp)")


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("threads,cluster", [(1, 8), (2, 1), (3, 3)])
def test_compiled_engine_equals_previous_implementations(device_species, threads, cluster):
    """The compiled engine (threads, groups of rows, the mirrored half) equals the numpy
    engine and the reference implementation to 1e-12 on a structure of five species, at
    Gamma and two k-points; S(k) is Hermitian and has no explicit zeros."""
    atoms = _device_piece(seed=threads)
    kpts = [[0.0, 0.0, 0.0], [0.2, -0.35, 0.0], [0.5, 0.5, 0.0]]
    fast = OverlapCalculator(device_species, engine="numba", threads=threads)
    fast.cluster = cluster
    slow = OverlapCalculator(device_species, engine="numpy")
    old = _reference_module().OverlapCalculator(device_species)
    S, S1, S0 = fast.overlap(atoms), slow.overlap(atoms), old.overlap(atoms)
    assert S.nnz > 0.3 * S.shape[0] ** 2  # dense enough to exercise every path
    assert np.abs((S - S1).toarray()).max() < 1e-12
    assert np.abs((S - S0).toarray()).max() < 1e-12
    _check_csr(S)
    assert abs(S - S.T).max() < 1e-15
    assert set(fast.timings) >= {"neighbours", "assembly", "total"}
    for k, Sk, S1k in zip(kpts, fast.overlap(atoms, kpts=kpts), slow.overlap(atoms, kpts=kpts)):
        assert Sk.dtype == (np.complex128 if np.any(k) else np.float64)
        assert np.abs((Sk - S1k).toarray()).max() < 1e-12
        assert abs(Sk - Sk.conj().T).max() < 1e-15
        _check_csr(Sk)
    S_p, O, P, dO = fast.overlap(atoms, parts=True)
    O1 = slow.overlap(atoms, parts=True)[1]
    assert np.abs((O - O1).toarray()).max() < 1e-12
    assert np.abs((O + P.T @ dO @ P - S_p).toarray()).max() < 1e-12


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("kind", ["device", "small cell"])
def test_compiled_pair_lists_equal_numpy_ones(kind):
    """The compiled neighbour filter and projector-pair sort give exactly the pairs,
    orientations, shifts and order of the numpy code: a device piece and a two-atom
    cell whose atoms see their own periodic images."""
    from ase.build import bulk

    from gpaw_tools.overlap import _compiled

    assert _compiled()
    atoms = _device_piece(seed=4) if kind == "device" else bulk("W", "bcc", 3.16) * (2, 1, 1)
    rng = np.random.default_rng(1)
    rc, rp = rng.uniform(3.0, 6.0, len(atoms)), rng.uniform(1.0, 3.0, len(atoms))
    fast = OverlapCalculator._pairs(atoms, rc, rp, compiled=True)
    slow = OverlapCalculator._pairs(atoms, rc, rp, compiled=False)
    for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    c, b = slow[1][0], slow[1][1]
    assert len(c) > len(atoms) and (c == b).sum() > len(atoms)  # self images present


def test_engine_choice(chon):
    with pytest.raises(ValueError, match="engine="):
        OverlapCalculator(chon, engine="fortran")
    oc = OverlapCalculator(chon, engine="numba" if HAVE_NUMBA else "numpy", threads=2)
    assert oc.threads == 2
    oc.overlap(Atoms("H2O", positions=[[0, 0, 0], [0.76, 0.59, 0], [-0.76, 0.59, 0]]))
    assert oc.timings["total"] > 0


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


@pytest.mark.parametrize("engine", ENGINES)
def test_screened_overlap_against_gpaw_and_its_eigenvalues(chain_kpts, chon, engine):
    """screen=e: every element of S(k) within e of GPAW's at every k-point, and the
    generalised eigenvalues of GPAW's own H(k) with the screened S(k) equal GPAW's."""
    from gpaw import GPAW
    from gpaw.lcao.tools import get_lcao_hamiltonian
    from scipy.linalg import eigh

    atoms, kpts, S_ref = _gpaw_S(chain_kpts[0])
    H_ref = get_lcao_hamiltonian(GPAW(str(chain_kpts[0]), txt=None))[0][0]  # spin 0, eV
    for e in (1e-8, 1e-4):
        S = OverlapCalculator(chon, engine=engine, screen=e).overlap(atoms, kpts=kpts)
        for Sk, ref, Hk in zip(S, S_ref, H_ref):
            assert np.abs(Sk.toarray() - ref).max() <= e
            assert (np.abs(Sk.data) > e / 2).all()  # small elements dropped
            assert abs(Sk - Sk.conj().T).max() < 1e-15
            exact, screened = (
                eigh(Hk, ref, eigvals_only=True),
                eigh(Hk, Sk.toarray(), eigvals_only=True),
            )
            assert np.abs(screened - exact).max() < (1e-6 if e == 1e-8 else 1e-2)
    exact = OverlapCalculator(chon, engine=engine).overlap(atoms)
    assert S[0].nnz < exact.nnz  # 1e-4 really dropped elements


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("screen", [1e-8, 1e-6])
def test_screening_bound_and_savings_on_the_device_species(device_species, screen):
    """Five species with long tails: the screened S is within ``screen`` of the exact S
    everywhere (Gamma and a k-point), Hermitian, stores fewer elements, and the numpy
    engine (which only drops small elements) is within ``screen`` too."""
    atoms = _device_piece(seed=4, n=40)
    atoms.cell[2, 2] = 20.0
    kpts = [[0.0, 0.0, 0.0], [0.3, -0.2, 0.0]]
    exact = OverlapCalculator(device_species, engine="numba").overlap(atoms, kpts=kpts)
    fast = OverlapCalculator(device_species, engine="numba", screen=screen)
    slow = OverlapCalculator(device_species, engine="numpy", screen=screen)
    for S0, S, S1 in zip(exact, fast.overlap(atoms, kpts=kpts), slow.overlap(atoms, kpts=kpts)):
        err = np.abs((S - S0).toarray()).max()
        assert 0 < err <= screen  # something was left out, and no more than allowed
        assert np.abs((S1 - S0).toarray()).max() <= screen
        assert S.nnz < S0.nnz
        assert abs(S - S.conj().T).max() < 1e-15
        _check_csr(S)
    # the per-call value overrides the calculator's
    assert fast.overlap(atoms, screen=0.0).nnz == exact[0].nnz
    with pytest.raises(ValueError, match="screen"):
        OverlapCalculator(device_species, screen=-1e-8)
    with pytest.raises(ValueError, match="screen"):
        fast.overlap(atoms, screen=float("nan"))


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_kept_buffers_give_the_same_S_for_structures_of_any_size(device_species):
    """keep_buffers: a calculator reused for larger, smaller and larger structures, at
    Gamma and a k-point (complex products), screened and exact, gives exactly the S of
    a calculator that keeps nothing; the scratch arrays are kept between calls and
    never part of a result; release_buffers frees them."""
    kept = OverlapCalculator(device_species, engine="numba", keep_buffers=True)
    fresh = OverlapCalculator(device_species, engine="numba", keep_buffers=False)
    kpts = [[0.0, 0.0, 0.0], [0.3, -0.2, 0.0]]
    for seed, n, screen in ((5, 40, 1e-8), (6, 12, 0.0), (7, 30, 1e-6), (8, 40, 0.0)):
        atoms = _device_piece(seed=seed, n=n)
        for k, A, B in zip(
            kpts,
            kept.overlap(atoms, kpts=kpts, screen=screen),
            fresh.overlap(atoms, kpts=kpts, screen=screen),
        ):
            assert A.dtype == (np.complex128 if any(k) else np.float64)
            assert A.nnz == B.nnz
            assert np.array_equal(A.indices, B.indices) and np.array_equal(A.data, B.data)
            for name, buf in kept._buffers.items():
                assert not np.shares_memory(buf, A.data), name
        S = kept.overlap(atoms, screen=screen)  # Gamma alone after the k-points
        assert np.array_equal(S.data, fresh.overlap(atoms, screen=screen).data)
    assert {"oblocks", "pblocks", "qflat"} <= set(kept._buffers)
    assert not fresh._buffers
    # pickled or copied without its lock and kept arrays; the copy computes the same S
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(kept)), copy.deepcopy(kept)):
        assert not clone._buffers
        C = clone.overlap(atoms, screen=screen)  # its expansions made again: rounding
        assert np.array_equal(C.indices, S.indices)
        np.testing.assert_allclose(C.data, S.data, rtol=0, atol=1e-13)
    kept.release_buffers()
    assert not kept._buffers


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_one_calculator_shared_by_threads(device_species):
    """Calls from several threads on one calculator (the prediction's worker thread and
    the caller) are serialised: each gets its own structure's S."""
    from concurrent.futures import ThreadPoolExecutor

    calc = OverlapCalculator(device_species, engine="numba", screen=1e-8)
    pieces = [_device_piece(seed=s, n=n) for s, n in ((9, 20), (10, 34), (11, 26), (12, 16))]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(calc.overlap, pieces))
    for atoms, S in zip(pieces, got):
        ref = OverlapCalculator(device_species, engine="numba", screen=1e-8, keep_buffers=False)
        assert np.array_equal(S.toarray(), ref.overlap(atoms).toarray())


def test_far_apart_atoms_do_not_stop_the_process(chon):
    """An atom 3e6 A from the rest (vesin 0.6 stops the process on such spans; ASE's
    list is used): its S is its on-site block, the rest is the molecule's."""
    far = Atoms("H2O", positions=[[3e6, 0.0, 0.0], [0.76, 0.0, 0.6], [0.0, 0.0, 0.0]])
    near = far[1:]
    S = OverlapCalculator(chon).overlap(far).toarray()
    S_near = OverlapCalculator(chon).overlap(near).toarray()
    S_h = OverlapCalculator(chon).overlap(far[:1]).toarray()
    n = S_h.shape[0]
    np.testing.assert_allclose(S[:n, :n], S_h, atol=1e-14)
    np.testing.assert_allclose(S[n:, n:], S_near, atol=1e-14)
    assert not S[:n, n:].any() and not S[n:, :n].any()
