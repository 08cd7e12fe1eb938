"""Electronic-layer spectra and k-points on small hand-made matrices (no GPAW, no JAX)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la
import scipy.sparse as sp
from ase import Atoms

from ase_gearsh.electronic.checks import ArgumentError, check_choice, check_positive
from ase_gearsh.electronic.dense import occupation_numbers
from ase_gearsh.electronic.kpoints import KPoints, check_kpts, is_grid
from ase_gearsh.electronic.spectrum import (
    KPM_DEFAULTS,
    DenseSpectrum,
    KPMOptions,
    KPMSpectrum,
    OrbitalLabels,
    check_dos_args,
    check_kpm_options,
)

COUNTS = [4, 1, 1, 4, 1, 1]  # orbitals per atom: two "water-like" molecules
SYMBOLS = ["O", "H", "H", "O", "H", "H"]
N = sum(COUNTS)


def hermitian(rng, n, scale=1.0):
    a = rng.normal(scale=scale, size=(n, n))
    return 0.5 * (a + a.T)


@pytest.fixture(scope="module")
def chain():
    """Real-space H(R), S(R) for R = 0, +-1 along z, and the Bloch sums k -> H(k), S(k)."""
    rng = np.random.default_rng(0)
    H0 = hermitian(rng, N, 2.0) + np.diag(rng.uniform(-8, 2, N))
    H1 = rng.normal(scale=0.5, size=(N, N))
    S0 = np.eye(N) + 0.05 * hermitian(rng, N)
    S1 = 0.03 * rng.normal(size=(N, N))

    def bloch(M0, M1):
        def at(k):
            phase = np.exp(2j * np.pi * k[2])
            M = M0 + M1 * phase + M1.T * np.conj(phase)
            return sp.csr_matrix(M.real if not np.any(k) else M)

        return at

    H, S = bloch(H0, H1), bloch(S0, S1)
    assert la.eigvalsh(S(np.zeros(3)).toarray()).min() > 0.5
    return H, S


@pytest.fixture(scope="module")
def labels():
    return OrbitalLabels.from_counts(COUNTS, SYMBOLS)


def kgrid(n=6):
    atoms = Atoms("H", cell=[5.0, 5.0, 2.0], pbc=[False, False, True])
    return KPoints.from_parameter((1, 1, n), atoms)


def test_orbital_labels(labels):
    assert labels.atom_of.tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3, 4, 5]
    assert labels.species == ["O", "H"]
    assert labels.atom_matrix().shape == (6, N)
    groups = labels.groups("species")
    assert list(groups) == ["O", "H"] and groups["H"].tolist() == [4, 5, 10, 11]
    atoms = labels.groups("atom")
    assert list(atoms) == [f"atom{i}" for i in range(6)] and atoms["atom3"].tolist() == [6, 7, 8, 9]
    per_atom = np.arange(12.0).reshape(6, 2)
    assert labels.from_atoms(per_atom, "atom") is per_atom
    species = labels.from_atoms(per_atom, "species")
    assert np.allclose(species["O"], per_atom[0] + per_atom[3])
    assert np.allclose(
        labels.from_groups({f"atom{i}": per_atom[i] for i in range(6)}, "atom"), per_atom
    )
    with pytest.raises(ArgumentError, match="by must be 'species' or 'atom', got 'orbital'"):
        labels.groups("orbital")


def test_dense_eigenvalues_match_eigh(chain, labels):
    H, S = chain
    kp = kgrid()
    spec = DenseSpectrum(H, S, kp.ibz, kp.weights, labels)
    eps = spec.eigenvalues()
    assert eps.shape == (len(kp.ibz), N)
    for q, k in enumerate(kp.ibz):
        ref = la.eigh(H(k).toarray(), S(k).toarray(), eigvals_only=True)
        assert np.abs(eps[q] - ref).max() < 1e-10
    assert spec.eigenvalues() is eps  # cached
    # time reversal: H(-k) = conj H(k), same spectrum, so the IBZ loses nothing
    k = np.array([0.0, 0.0, 1 / 3])
    assert np.allclose(
        la.eigh(H(k).toarray(), S(k).toarray(), eigvals_only=True),
        la.eigh(H(-k).toarray(), S(-k).toarray(), eigvals_only=True),
    )
    e_m, weights = spec.mulliken()
    assert np.abs(e_m - eps).max() < 1e-9
    assert weights.shape == (len(kp.ibz), 6, N)
    assert np.allclose(weights.sum(1), 1.0)  # every state's Mulliken weights sum to one


@pytest.mark.parametrize("width", [0.01, 0.2])
def test_fermi_level_and_occupations(chain, labels, width):
    H, S = chain
    kp = kgrid()
    spec = DenseSpectrum(H, S, kp.ibz, kp.weights, labels)
    eps = spec.eigenvalues()
    n_occ = 7
    ef = spec.fermi_level(2.0 * n_occ, width)
    occ = np.array([occupation_numbers(eps[q], ef, width) for q in range(len(eps))])
    assert (kp.weights @ occ.sum(1)) == pytest.approx(2.0 * n_occ, abs=1e-8)
    assert occ.min() >= 0.0 and occ.max() <= 2.0
    if width == 0.01:  # nearly a step: n_electrons / 2 states below the level
        below = kp.weights @ (eps < ef).sum(1)
        assert below == pytest.approx(n_occ, abs=0.02)


def test_fermi_level_of_an_insulator_is_mid_gap(labels):
    rng = np.random.default_rng(3)
    H, S = hermitian(rng, N, 2.0), np.eye(N) + 0.05 * hermitian(rng, N)
    spec = DenseSpectrum(
        lambda k: sp.csr_matrix(H), lambda k: sp.csr_matrix(S), np.zeros((1, 3)), [1.0], labels
    )
    eps = la.eigh(H, S, eigvals_only=True)
    assert np.abs(spec.eigenvalues()[0] - eps).max() < 1e-10
    assert spec.fermi_level(8.0, 0.001) == pytest.approx(0.5 * (eps[3] + eps[4]))


def test_dense_dos_and_pdos(chain, labels):
    H, S = chain
    kp = kgrid()
    spec = DenseSpectrum(H, S, kp.ibz, kp.weights, labels)
    e, dos = spec.dos(width=0.2, npts=4001)
    assert np.trapezoid(dos, e) == pytest.approx(N, rel=1e-6)
    e2, pdos = spec.pdos(width=0.2, npts=4001)
    assert list(pdos) == ["O", "H"]
    assert np.abs(e2 - e).max() < 1e-9
    assert np.abs(sum(pdos.values()) - dos).max() < 1e-9 * dos.max()
    _, per_atom = spec.pdos(width=0.2, npts=4001, by="atom")
    assert per_atom.shape == (6, 4001)
    assert np.abs(per_atom.sum(0) - dos).max() < 1e-9 * dos.max()
    assert np.allclose(per_atom[[0, 3]].sum(0), pdos["O"])
    # a given window
    e3, dos3 = spec.dos(width=0.2, npts=11, emin=-1.0, emax=1.0)
    assert np.allclose(e3, np.linspace(-1, 1, 11)) and dos3.shape == (11,)


def test_kpm_spectrum(chain, labels, monkeypatch):
    import ase_gearsh.electronic.spectrum as spectrum_module

    made = []
    factor_class = spectrum_module.CholeskyFactor
    monkeypatch.setattr(
        spectrum_module,
        "CholeskyFactor",
        lambda S, **kw: made.append(kw["precision"]) or factor_class(S, **kw),
    )
    H, S = chain
    zero = np.zeros(3)
    dense = DenseSpectrum(H, S, np.zeros((1, 3)), [1.0], labels)
    eps = dense.eigenvalues()[0]
    kpm = KPMSpectrum(H(zero), S(zero), labels, {"n_moments": 200, "n_random": 32, "seed": 1})
    lo, hi = kpm.bounds
    assert lo < eps[0] and hi > eps[-1]
    e, dos = kpm.dos(width=0.3, npts=4001)
    assert e[0] == lo and e[-1] == hi
    assert np.trapezoid(dos, e) == pytest.approx(N, rel=0.02)
    total = kpm.moments(0.3, None)  # the DOS alone: the total row, two moments per step
    assert total.names == ["total"] and total.moments.shape == (1, 200)
    _, pdos = kpm.pdos(width=0.3, npts=4001)
    assert list(pdos) == ["O", "H"]
    assert np.abs(sum(pdos.values()) - dos).max() < 1e-8 * dos.max()
    _, per_atom = kpm.pdos(width=0.3, npts=4001, by="atom")
    assert per_atom.shape == (6, 4001)
    assert np.abs(per_atom.sum(0) - dos).max() < 1e-8 * dos.max()
    # moments are cached per (number of moments, projection): a fixed n_moments shares them
    assert kpm.moments(0.3) is kpm.moments(0.05)
    assert kpm.moments(0.3).moments.shape == (3, 200)
    assert kpm.moments(0.3, "atom").moments.shape == (7, 200)
    # the same random vectors: the projection's total row is the DOS's, to rounding
    np.testing.assert_allclose(kpm.moments(0.3).moments[0], total.moments[0], atol=1e-9 * N)
    ef = kpm.fermi_level(8.0)
    assert ef == kpm.fermi_level(8.0)
    resolution = np.pi * kpm.moments(0.3).half_width / 200
    assert eps[3] - 3 * resolution <= ef <= eps[4] + 3 * resolution
    # other options: same bounds, new moments; automatic number of moments from the width
    auto = kpm.with_options(None)
    assert auto.bounds == kpm.bounds and auto.options == KPMOptions()
    assert auto.n_moments(0.1) > auto.n_moments(0.5) >= 64
    auto.moments(0.5)
    served = auto.moments(0.5, None)  # a projection serves the total: its row 0 alone
    assert served.names == ["total"] and served.moments.shape == (1, auto.n_moments(0.5))
    np.testing.assert_array_equal(served.moments[0], auto.moments(0.5).moments[0])
    assert auto.moments(0.5, None) is served
    assert made == ["auto"]  # S is factorised once for bounds, all moments and new options
    assert kpm.factor.precision == "double"  # 'auto' below SINGLE_MIN orbitals
    # single-precision solves: a new factor, the same bounds, the same DOS to round-off
    single = kpm.with_options({"n_moments": 200, "n_random": 32, "seed": 1, "precision": "single"})
    assert single.bounds == kpm.bounds
    _, dos_single = single.dos(width=0.3, npts=4001)
    assert made == ["auto", "single"] and single.factor.precision == "single"
    assert 0 < np.abs(dos_single - dos).max() < 1e-4 * dos.max()


def test_kpoint_grid_reduction():
    sheet = Atoms(
        "C2",
        cell=[[2.46, 0, 0], [-1.23, 2.13, 0], [0, 0, 10.0]],
        positions=[[0, 0, 5], [0, 1.42, 5]],
        pbc=[True, True, False],
    )
    kp = KPoints.from_parameter({"size": (4, 4, 1), "gamma": True}, sheet)
    assert kp.bz.shape == (16, 3) and kp.ibz.shape == (10, 3)  # 4 TRIM points + 12 / 2
    assert kp.weights.sum() == pytest.approx(1.0)
    assert sorted(set(np.round(16 * kp.weights))) == [1.0, 2.0]
    assert np.allclose(np.bincount(kp.bz_to_ibz) / 16, kp.weights)

    def same(x, y):  # equal modulo reciprocal lattice vectors
        return np.all(np.abs(x - y - np.round(x - y)) < 1e-9, axis=1)

    assert np.all(same(kp.ibz[kp.bz_to_ibz], kp.bz) | same(-kp.ibz[kp.bz_to_ibz], kp.bz))
    assert not kp.gamma_only and not kp.ibz.flags.writeable
    # an MP size is a grid, a list is kept as given
    assert is_grid((4, 4, 1)) and is_grid({"size": (2, 2, 1)}) and not is_grid([[0, 0, 0]])
    pts = [[0, 0, 0], [0.25, 0, 0], [-0.25, 0, 0]]
    listed = KPoints.from_parameter(pts, sheet)
    assert np.allclose(listed.ibz, pts) and np.allclose(listed.weights, 1 / 3)
    assert listed.bz_to_ibz.tolist() == [0, 1, 2]
    gamma = KPoints.from_parameter(None, sheet)
    assert gamma.gamma_only and gamma.weights.tolist() == [1.0]
    # kpt arguments
    assert kp.index(3) == 3 and np.allclose(kp.vector(3), kp.ibz[3])
    assert np.allclose(kp.vector(None), 0) and np.allclose(kp.vector([0.1, 0.2, 0]), [0.1, 0.2, 0])
    with pytest.raises(ArgumentError, match=r"index must be an integer in \[0, 10\), got 10"):
        kp.index(10)
    with pytest.raises(ArgumentError, match="components along non-periodic"):
        kp.vector([0, 0, 0.25])
    with pytest.raises(ArgumentError, match=r"of shape \(3,\), got shape \(2,\)"):
        kp.vector([0.1, 0.2])
    with pytest.raises(ArgumentError, match="samples non-periodic directions"):
        KPoints.from_parameter((2, 2, 2), sheet)


def test_argument_checks():
    assert check_kpts((4, 4, 1)) == (4, 4, 1) and check_kpts(None) is None
    for bad, match in [
        ((2, 2), r"kpts must be None.*tuple of shape \(2,\)"),
        ((0, 1, 1), r"three positive integers.*got \[0, 1, 1\]"),
        ({"size": (2, 2, 1), "shift": 1}, r"unknown key\(s\) \['shift'\]"),
        ({"gamma": True}, "needs 'size', 'density' or 'path'"),
        ([[0, np.nan, 0]], "must be finite"),
    ]:
        with pytest.raises(ArgumentError, match=match):
            check_kpts(bad)
    check_kpm_options(None)
    check_kpm_options({"n_moments": 100, "n_random": 4})
    with pytest.raises(ArgumentError, match=r"kpm\['n_random'\] must be an integer > 0, got 0"):
        check_kpm_options({"n_random": 0})
    with pytest.raises(ArgumentError, match=r"kpm: unknown key\(s\) \['moments'\]"):
        KPMOptions.from_parameter({"moments": 5})
    assert KPM_DEFAULTS == {
        "n_moments": None,
        "n_random": 16,
        "seed": 0,
        "fermi_width": 0.1,
        "deep_below": "auto",
        "precision": "auto",
        "resolution_at": "interval",
    }
    for good in ("auto", "single", "double"):
        check_kpm_options({"precision": good})
    with pytest.raises(
        ArgumentError, match=r"kpm\['precision'\] must be 'double', 'single' or 'auto', got 'half'"
    ):
        check_kpm_options({"precision": "half"})
    for good in (-30, -30.5, None, "auto"):
        check_kpm_options({"deep_below": good})
    for bad in ("-30", True, np.nan):
        with pytest.raises(ArgumentError, match=r"kpm\['deep_below'\] must be 'auto', None or"):
            check_kpm_options({"deep_below": bad})
    check_dos_args(0.1, 2001, None, None, "auto")
    for args, match in [
        (
            (0, 10, None, None),
            r"width \(DOS broadening, eV\) must be a finite "
            r"number > 0, got 0",
        ),
        ((0.1, 1, None, None), "npts must be an integer >= 2, got 1"),
        ((0.1, 10, 1, 0), "need emin < emax, got emin=1, emax=0"),
    ]:
        with pytest.raises(ArgumentError, match=match):
            check_dos_args(*args)
    with pytest.raises(ArgumentError, match="method must be 'auto', 'dense' or 'kpm', got 'x'"):
        check_dos_args(0.1, 10, None, None, "x")
    with pytest.raises(ArgumentError, match=">= 0, got -1"):
        check_positive("n", -1, integer=True, allow_zero=True)
    with pytest.raises(ArgumentError, match="> 0, got True"):
        check_positive("n", True)
    check_choice("by", "atom", ("species", "atom"))
