"""GearsHCalculator: physics against GPAW (oracle blocks), symmetry, DOS, errors."""

import functools
import importlib.util
import json
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import CalculatorSetupError, PropertyNotPresent

import ase_gearsh.calculator as calculator_module
from ase_gearsh import GearsHCalculator
from ase_gearsh.calculator import CalculatorInputError, PropertyUnavailableError
from ase_gearsh.core.basis import RegistryError
from ase_gearsh.core.data import Dataset
from ase_gearsh.core.errors import GearsHError
from ase_gearsh.model.checkpoint import CheckpointError, save_checkpoint
from ase_gearsh.model.coverage import ExtrapolationWarning, training_coverage


class Oracle:
    """Stands in for the network: returns the dataset's GPAW blocks."""

    def __init__(self, structure):
        self.s = structure

    def __call__(self, atoms, progress=False, layout=False):  # the Predictor's call
        assert np.allclose(atoms.positions, self.s.atoms.positions)
        return self.s.blocks("H")


@pytest.fixture(scope="module")
def model(small_model, water_dataset, chain_dataset):
    """The small random model with basis functions and training coverage attached."""
    from gpaw_tools.overlap import basis_for_registry

    m = small_model
    m.basis_data = {k: v.to_dict() for k, v in basis_for_registry(m.registry, "PBE", "paw").items()}
    structures = list(Dataset(water_dataset)) + list(Dataset(chain_dataset))
    graphs = [m.graph(s.atoms) for s in structures]
    m.coverage = training_coverage(graphs, m.registry.n_species)
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    """The model written to a checkpoint file (with basis functions and coverage)."""
    import jax

    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    save_checkpoint(
        ckpt,
        config=model.config,
        settings=model.settings,
        registry=model.registry.to_dict(),
        stats={k: np.asarray(v) for k, v in model.stats.items()},
        params=jax.device_get(model.params),
        extra={"coverage": model.coverage},
        basis=model.basis_data,
    )
    return ckpt


def oracle_calc(model, structure, **kw):
    calc = GearsHCalculator(model, warn_extrapolation=False, **kw)
    calc._predictor = Oracle(structure)
    atoms = structure.atoms.copy()
    atoms.calc = calc
    return atoms, calc


def test_oracle_eigenvalues_equal_gpaw_gamma(model, water_dataset):
    s = Dataset(water_dataset)[0]
    atoms, calc = oracle_calc(model, s)
    assert np.abs(calc.get_overlap().toarray() - s.overlap()).max() < 1e-8  # exact S
    ref = s.reference_eigenvalues[0, 0]
    eps = calc.get_eigenvalues()
    assert np.abs(eps[: len(ref)] - ref).max() < 1e-6
    assert calc.get_number_of_electrons() == 8.0
    homo, lumo = eps[3], eps[4]
    assert calc.get_fermi_level() == pytest.approx(0.5 * (homo + lumo), abs=1e-9)
    assert isinstance(calc.results["hamiltonian"], sp.csr_matrix)
    # GPAW's occupied levels are not along S's near-null directions
    assert calc.get_near_null_levels().tolist() == [0]
    assert calc.get_near_null_levels(threshold=0.5).tolist() == [4]  # all |c|^2 > 0.5
    _, big = oracle_calc(model, s, dense_limit=10)  # 23 orbitals: the KPM path
    with pytest.raises(PropertyUnavailableError, match="dense_limit=10"):
        big.get_near_null_levels()


def test_overlap_alongside_the_network_is_the_same_s(model, water_dataset):
    """S computed in a worker thread during the prediction equals GPAW's S and the
    S computed afterwards; a failure there does not stop a prediction of H."""
    s = Dataset(water_dataset)[0]
    atoms, calc = oracle_calc(model, s, overlap_alongside=1)
    calc.blocks()
    assert ("S", (0.0, 0.0, 0.0)) in calc._cache  # ready with the blocks
    S = calc.get_overlap()
    assert np.abs(S.toarray() - s.overlap()).max() < 1e-8
    atoms2, calc2 = oracle_calc(model, s, overlap_alongside=None)
    calc2.blocks()
    assert ("S", (0.0, 0.0, 0.0)) not in calc2._cache  # off: computed when asked for
    assert abs(calc2.get_overlap() - S).max() == 0.0
    np.testing.assert_array_equal(calc.get_eigenvalues(), calc2.get_eigenvalues())
    with pytest.raises(CalculatorInputError, match="overlap_alongside"):
        GearsHCalculator(model, overlap_alongside=-3)
    # no basis functions: S fails in the worker, H is still predicted, S raises where asked
    data, model.basis_data = model.basis_data, {"O": model.basis_data["O"]}
    try:
        atoms3, calc3 = oracle_calc(model, s, overlap_alongside=1)
        assert calc3.get_hamiltonian().shape == S.shape
        with pytest.raises(GearsHError, match=r"no basis functions for element\(s\) \['H'\]"):
            calc3.get_overlap()
    finally:
        model.basis_data = data


def test_overlap_screen_parameter(model, water_dataset):
    """overlap_screen: the default (1e-8) and a coarse value keep S within the value
    of GPAW's; 0 gives GPAW's S to rounding; the alongside path uses it too; bad
    values are refused with the range expected."""
    s = Dataset(water_dataset)[0]
    ref = s.overlap()
    assert GearsHCalculator.default_parameters["overlap_screen"] == 1e-8
    for screen, alongside in ((0.0, None), (1e-8, None), (1e-3 / 2, 1), (1e-3 / 2, None)):
        atoms, calc = oracle_calc(model, s, overlap_screen=screen, overlap_alongside=alongside)
        S = calc.get_overlap()
        err = np.abs(S.toarray() - ref).max()
        assert err <= max(screen, 1e-13)
        if screen > 1e-4:  # a coarse value really drops elements of this molecule
            assert np.sum(np.abs(ref) > 0) > S.nnz and (np.abs(S.data) > screen / 2).all()
    for bad in (-1e-8, 1e-2, float("nan"), "1e-8", True):
        with pytest.raises(CalculatorInputError, match="overlap_screen"):
            GearsHCalculator(model, overlap_screen=bad)


def test_oracle_eigenvalues_equal_gpaw_at_every_kpoint(model, chain_dataset, chain_kpts):
    s = Dataset(chain_dataset)[0]
    kpts = s.reference_kpts
    atoms, calc = oracle_calc(model, s, kpts=kpts)
    assert len(calc.get_ibz_k_points()) == len(kpts)
    for q in range(len(kpts)):
        ref = s.reference_eigenvalues[0, q]
        assert np.abs(calc.get_eigenvalues(kpt=q)[: len(ref)] - ref).max() < 1e-6
    assert calc.get_near_null_levels().tolist() == [0] * len(kpts)  # at every k
    # an off-grid k against GPAW's fixed-density run: H(R) and S(R) from all images
    _, k_off, eps_ref = chain_kpts
    atoms, calc = oracle_calc(model, s, kpts=[k_off])
    assert np.abs(calc.get_eigenvalues(kpt=0)[: len(eps_ref)] - eps_ref).max() < 1e-6
    S_k = calc.get_overlap(kpt=k_off)
    assert np.abs(S_k.toarray() - s.overlap(kpt=k_off)).max() < 1e-8


def test_overlap_cutoff_parameter(model, chain_dataset):
    """``overlap_cutoff``: eigenvalues by canonical orthogonalisation at every k, with
    equal band counts; below S's smallest eigenvalue GPAW's eigenvalues; refused when
    outside [0, 1)."""
    s = Dataset(chain_dataset)[0]
    kpts = s.reference_kpts
    lam = [np.linalg.eigvalsh(s.overlap(k)) for k in kpts]
    atoms, calc = oracle_calc(model, s, kpts=kpts, overlap_cutoff=0.5 * min(x[0] for x in lam))
    for q in range(len(kpts)):
        ref = s.reference_eigenvalues[0, q]
        assert np.abs(calc.get_eigenvalues(kpt=q)[: len(ref)] - ref).max() < 1e-6
    n_full = len(calc.get_eigenvalues(kpt=0))
    cut = float(np.median([x[2] for x in lam]))
    calc.set(overlap_cutoff=cut)  # drops the spectra, keeps H and S
    kept = min(int((x >= cut).sum()) for x in lam)
    assert kept < n_full
    assert all(len(calc.get_eigenvalues(kpt=q)) == kept for q in range(len(kpts)))
    assert calc.get_fermi_level() < calc.get_eigenvalues(kpt=0).max()
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(CalculatorInputError, match="overlap_cutoff"):
            GearsHCalculator(model, overlap_cutoff=bad)


def test_gamma_of_supercell_equals_folded_kpoints(model, make_atoms):
    """Model H of a 3x supercell at Gamma has the primitive eigenvalues at k = 0, +-1/3."""
    chain = make_atoms.chain
    prim = chain()
    calc = GearsHCalculator(
        model, kpts=[[0, 0, 0], [0, 0, 1 / 3], [0, 0, -1 / 3]], warn_extrapolation=False
    )
    prim.calc = calc
    folded = np.sort(np.concatenate([calc.get_eigenvalues(kpt=q) for q in range(3)]))
    sup = prim.repeat((1, 1, 3))
    sup.calc = GearsHCalculator(model, warn_extrapolation=False)
    direct = np.sort(sup.calc.get_eigenvalues())
    assert np.abs(folded - direct).max() < 2e-4
    assert np.ptp(direct) > 10.0  # a real spectrum, not a constant
    # time-reversal reduction of a grid: k and -k merged, weights sum to one
    prim.calc = GearsHCalculator(model, kpts=(1, 1, 6), warn_extrapolation=False)
    assert len(prim.calc.get_ibz_k_points()) == 3
    assert prim.calc.get_k_point_weights().sum() == pytest.approx(1.0)
    # a path is kept in order, and ASE's band structure reads it
    path = [[0, 0, x] for x in np.linspace(0, 0.5, 5)]
    prim.calc.set(kpts=path)
    bs = prim.calc.band_structure(reference=0.0)
    assert bs.energies.shape == (1, 5, prim.calc.get_number_of_bands())
    assert np.allclose(bs.energies[0, 2], prim.calc.get_eigenvalues(kpt=2))
    assert np.allclose(prim.calc.get_ibz_k_points(), path)


def test_rotation_invariant_eigenvalues_and_covariant_blocks(model):
    from scipy.spatial.transform import Rotation

    from ase_gearsh.testing import orbital_rotation

    a = molecule("CH3OH")
    a.rattle(0.05, seed=2)
    a.center(vacuum=4.0)
    rot = Rotation.random(random_state=7).as_matrix()
    b = a.copy()
    b.positions = (a.positions - a.get_center_of_mass()) @ rot + a.get_center_of_mass()
    ca = GearsHCalculator(model, warn_extrapolation=False)
    cb = GearsHCalculator(model, warn_extrapolation=False)
    a.calc, b.calc = ca, cb
    l_per_atom = [
        model.registry.species[s - 1]["l"] for s in model.registry.species_index(a.numbers)
    ]
    D = orbital_rotation(rot, l_per_atom)
    Ha, Hb = ca.get_hamiltonian().toarray(), cb.get_hamiltonian().toarray()
    assert np.abs(D.T @ Ha @ D - Hb).max() < 2e-4 * max(1.0, np.abs(Ha).max() / 10)
    Sa, Sb = ca.get_overlap().toarray(), cb.get_overlap().toarray()
    assert np.abs(D.T @ Sa @ D - Sb).max() < 1e-10
    assert np.abs(ca.get_eigenvalues() - cb.get_eigenvalues()).max() < 2e-4


def test_dos_normalisation_and_pdos_sums(model, water_dataset):
    s = Dataset(water_dataset)[1]
    atoms, calc = oracle_calc(model, s)
    n = calc.get_number_of_bands()
    e, dos = calc.get_dos(width=0.1, npts=4001)
    assert np.trapezoid(dos, e) == pytest.approx(n, rel=1e-6)
    e2, pdos = calc.get_pdos(width=0.1, npts=4001)
    assert set(pdos) == {"O", "H"}
    assert np.abs(sum(pdos.values()) - dos).max() < 1e-10
    # Mulliken populations of the orbitals: O has 9, each H 5 (szp)
    assert np.trapezoid(pdos["O"], e) == pytest.approx(9.0, abs=1e-4)
    e3, per_atom = calc.get_pdos(width=0.1, npts=4001, by="atom")
    assert per_atom.shape == (3, 4001)
    assert np.abs(per_atom.sum(0) - dos).max() < 1e-10
    # elements taken together: one row, the sum of theirs
    _, both = calc.get_pdos(width=0.1, npts=4001, by=["H", "O"])  # the structure's order
    assert list(both) == ["O+H"] and np.abs(both["O+H"] - dos).max() < 1e-10
    _, same = calc.get_pdos(width=0.1, npts=4001, by=np.array(["O", "H"]))
    assert list(same) == ["O+H"]
    _, oxygen = calc.get_pdos(width=0.1, npts=4001, by=("O",))
    assert list(oxygen) == ["O"] and np.abs(oxygen["O"] - pdos["O"]).max() < 1e-12
    for by, msg in (
        (["Se"], r"by: \['Se'\] not in this structure; its elements are \['O', 'H'\]"),
        ([], "non-empty list of element symbols"),
        (["O", "O"], r"lists an element twice: \['O', 'O'\]; its elements are"),
        ("O", r"for that element alone: by=\['O'\]"),
        ("orbital", "by must be 'species' or 'atom'"),
        ([1], "non-empty list of element symbols"),
    ):
        with pytest.raises(CalculatorInputError, match=msg):
            calc.get_pdos(by=by)
    # ASE's DOS tool works on the calculator (it counts both spins of a spin-paired run)
    from ase.dft.dos import DOS

    d = DOS(calc, width=0.1, npts=801)
    assert np.trapezoid(d.get_dos(), d.get_energies()) == pytest.approx(2 * n, rel=1e-3)


def test_kpm_dos_matches_dense(model, make_atoms):
    """Kernel polynomial DOS and PDOS against dense diagonalisation (periodic chain)."""
    chain = make_atoms.chain
    atoms = chain().repeat((1, 1, 8))
    atoms.rattle(0.02, seed=1)
    kw = dict(warn_extrapolation=False, kpm={"n_moments": 400, "n_random": 64, "seed": 1})
    atoms.calc = GearsHCalculator(model, **kw)
    eps = atoms.calc.get_eigenvalues()
    lo, hi = eps.min() - 5, eps.max() + 5
    e, dense = atoms.calc.get_dos(width=0.3, method="dense", npts=3001, emin=lo, emax=hi)
    overlaps = calculator_module._OVERLAPS[model][1]
    kept = bool(overlaps._buffers)  # S's scratch arrays (compiled engine) kept so far
    _, kpm = atoms.calc.get_dos(width=0.3, method="kpm", npts=3001, emin=lo, emax=hi)
    assert not overlaps._buffers  # released before the Cholesky factorisation of S
    if overlaps._use_compiled():
        assert kept
    n = atoms.calc.get_number_of_bands()
    assert np.trapezoid(kpm, e) == pytest.approx(n, rel=0.01)
    de = e[1] - e[0]
    err = np.abs(np.cumsum(dense) * de - np.cumsum(kpm) * de).max()
    assert err < 0.03 * n, (err, n, lo, hi)
    _, pk = atoms.calc.get_pdos(width=0.3, method="kpm", npts=3001, emin=lo, emax=hi)
    assert set(pk) == {"C", "H"}
    assert np.abs(sum(pk.values()) - kpm).max() < 1e-8 * max(1.0, kpm.max())
    # one group of elements: two moments per Chebyshev step, the same numbers as the
    # species row from one moment per step (the same random vectors)
    _, carbon = atoms.calc.get_pdos(width=0.3, method="kpm", npts=3001, emin=lo, emax=hi, by=["C"])
    assert np.abs(carbon["C"] - pk["C"]).max() < 1e-8 * max(1.0, kpm.max())
    assert atoms.calc.kpm_moments(0.3, by=["C"]).names == ["total", "C"]
    # the KPM Fermi level (a calculator with KPM above 10 orbitals) lies between HOMO
    # and LUMO, up to the KPM resolution
    mom = atoms.calc.kpm_moments(0.3)
    assert mom.moments.shape[1] == 400
    resolution = np.pi * mom.half_width / 400
    n_occ = int(round(atoms.calc.get_number_of_electrons() / 2))
    kpm_calc = GearsHCalculator(model, dense_limit=10, **kw)
    ef_kpm = kpm_calc.get_property("fermi_level", atoms)
    assert kpm_calc.uses_kpm() and not atoms.calc.uses_kpm()
    assert eps[n_occ - 1] - 2 * resolution <= ef_kpm <= eps[n_occ] + 2 * resolution, (
        ef_kpm,
        eps[n_occ - 1],
        eps[n_occ],
        resolution,
    )


def test_exact_window_states_match_dense(model, make_atoms):
    """Exact states near E_F (sparse LDL^T, shift-invert) against the dense spectrum:
    Fermi level, HOMO/LUMO, every eigenvalue in a window and its species weights."""
    pytest.importorskip("pypardiso")
    atoms = make_atoms.chain().repeat((1, 1, 8))
    atoms.rattle(0.02, seed=1)
    atoms.calc = GearsHCalculator(model, warn_extrapolation=False)
    eps = atoms.calc.get_eigenvalues()
    ef = atoms.calc.get_fermi_level()
    fs = atoms.calc.exact_fermi()
    n_occ = int(round(atoms.calc.get_number_of_electrons() / 2))
    assert fs.homo == pytest.approx(eps[n_occ - 1], abs=1e-6)
    assert fs.lumo == pytest.approx(eps[n_occ], abs=1e-6)
    assert fs.fermi_level == pytest.approx(ef, abs=1e-6)
    e, w = atoms.calc.get_window_states(ef - 3.0, ef + 2.0)
    ref = eps[(eps >= ef - 3.0) & (eps <= ef + 2.0)]
    np.testing.assert_allclose(e, ref, atol=1e-6)
    assert set(w) == {"C", "H"}
    np.testing.assert_allclose(w["C"] + w["H"], 1.0, atol=1e-8)
    _, wa = atoms.calc.get_window_states(ef - 3.0, ef + 2.0, by="atom")
    assert wa.shape == (len(atoms), len(e))
    _, wch = atoms.calc.get_window_states(ef - 3.0, ef + 2.0, by=["C", "H"])
    np.testing.assert_allclose(wch["C+H"], 1.0, atol=1e-8)
    # a window ending in the gap (the hole window below the band edge): own shift there
    assert fs.lumo - fs.homo > 0.01
    e_edge, _ = atoms.calc.get_window_states(fs.homo - 1.0, fs.homo + 1e-4)
    np.testing.assert_allclose(
        e_edge, eps[(eps >= fs.homo - 1.0) & (eps <= fs.homo + 1e-4)], atol=1e-6
    )
    assert not fs.factor.freed  # kept for later windows near E_F
    e_rel, _ = atoms.calc.get_window_states(fs.homo - 1.0, fs.homo + 1e-4, keep_factor=False)
    assert fs.factor.freed  # the window had its own factorisation: E_F's was released
    np.testing.assert_allclose(e_rel, e_edge, atol=1e-9)
    e_again, _ = atoms.calc.get_window_states(ef - 3.0, ef + 2.0)  # factorises anew
    np.testing.assert_allclose(e_again, ref, atol=1e-6)
    with pytest.raises(CalculatorInputError, match="keep_factor must be True or False"):
        atoms.calc.get_window_states(ef - 3.0, ef + 2.0, keep_factor="no")
    # against the dense Mulliken weights: the PDOS of the dense path, sharply broadened
    import scipy.linalg as sla

    H, S = atoms.calc.get_hamiltonian().toarray(), atoms.calc.get_overlap().toarray()
    E, C = sla.eigh(H, S)
    sel = (E >= ef - 3.0) & (E <= ef + 2.0)
    symbols = np.array(atoms.get_chemical_symbols())
    carbon = np.repeat(symbols == "C", atoms.calc.blocks().orbital_counts)
    wd = (C[:, sel] * (S @ C[:, sel]))[carbon].sum(axis=0)
    np.testing.assert_allclose(w["C"], wd, atol=1e-6)
    with pytest.raises(CalculatorInputError, match="expected emin < emax"):
        atoms.calc.get_window_states(1.0, 0.0)
    with pytest.raises(CalculatorInputError, match="emin must be a finite energy"):
        atoms.calc.get_window_states(float("nan"), 0.0)
    k_calc = GearsHCalculator(model, kpts=(1, 1, 3), warn_extrapolation=False)
    k_calc.get_property("fermi_level", atoms)  # the k-sampled chain: dense works
    with pytest.raises(PropertyUnavailableError, match="at Gamma only"):
        k_calc.get_window_states(-1.0, 0.0)


def test_state_is_cached_until_atoms_change(model):
    atoms = molecule("H2O")
    atoms.center(vacuum=3.0)
    atoms.calc = GearsHCalculator(model, warn_extrapolation=False)
    H1 = atoms.calc.get_hamiltonian()
    assert atoms.calc.get_hamiltonian() is H1  # cached
    e1 = atoms.calc.get_eigenvalues()
    atoms.positions[1] += [0.0, 0.05, 0.0]
    H2 = atoms.calc.get_hamiltonian()
    assert H2 is not H1 and abs(H2 - H1).max() > 1e-4
    assert np.abs(atoms.calc.get_eigenvalues() - e1).max() > 1e-5


def test_errors_are_clear(model, tmp_path):
    atoms = Atoms("SiH", positions=[[0, 0, 0], [0, 0, 1.5]])
    atoms.calc = GearsHCalculator(model)
    with pytest.raises(
        RegistryError, match="element Si is not known to this model; it was trained on H, C, O"
    ):
        atoms.calc.get_hamiltonian()
    with pytest.raises(CheckpointError, match="not found"):
        GearsHCalculator(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a (readable )?GEARS H checkpoint"):
        GearsHCalculator(bad)
    with pytest.raises(CalculatorSetupError, match=r"unknown parameter\(s\) \['kpoints'\]"):
        GearsHCalculator(model, kpoints=3)
    w = molecule("H2O")
    w.center(vacuum=3.0)
    w.calc = GearsHCalculator(model, kpts=(2, 2, 2))
    with pytest.raises(CalculatorSetupError, match="samples non-periodic directions"):
        w.calc.get_eigenvalues()
    w.calc = GearsHCalculator(model)
    with pytest.raises(ValueError, match=r"scaled k-point of shape \(3,\)"):
        w.calc.get_hamiltonian(kpt=[0.1, 0.2])
    with pytest.raises(ValueError, match="by must be 'species' or 'atom'"):
        w.calc.get_pdos(by="orbital")
    # extrapolation is a warning, not an error
    squeezed = molecule("H2O")
    squeezed.positions *= 0.7
    squeezed.center(vacuum=3.0)
    squeezed.calc = GearsHCalculator(model)
    with pytest.warns(ExtrapolationWarning, match="H-O bond.*shorter than any in training"):
        squeezed.calc.get_hamiltonian()
    # a lone atom has fewer neighbours than any atom in training (water: at least 2)
    lone = Atoms("O", positions=[[3.0, 3.0, 3.0]], cell=[6, 6, 6])
    lone.calc = GearsHCalculator(model)
    with pytest.warns(ExtrapolationWarning, match=r"1 O atom\(s\) with as few as 0 neighbours; "):
        lone.calc.get_hamiltonian()
    # a model without basis functions cannot give S, and says how to fix it
    data, model.basis_data = model.basis_data, None
    try:
        w.calc = GearsHCalculator(model)
        with pytest.raises(PropertyNotPresent, match="gearsh attach-basis"):
            w.calc.get_overlap()
    finally:
        model.basis_data = data


def test_predict_cli_writes_matrices_spectrum_and_plot(checkpoint, tmp_path, monkeypatch):
    from ase.io import read, write

    from ase_gearsh.cli import main

    ckpt = checkpoint
    a = molecule("CH3CH2OH")
    a.rattle(0.02, seed=3)
    a.center(vacuum=3.0)
    write(tmp_path / "ethanol.xyz", a)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        assert (
            main(["predict", str(tmp_path / "ethanol.xyz"), "-m", str(ckpt), "-o", str(out), "-q"])
            == 0
        )
    H = sp.load_npz(out / "hamiltonian.npz")
    S = sp.load_npz(out / "overlap.npz")
    a = read(tmp_path / "ethanol.xyz")  # positions as rounded in the file
    a.calc = GearsHCalculator(str(ckpt), warn_extrapolation=False)
    assert abs(H - a.calc.get_hamiltonian()).max() < 2e-5  # float32 network
    assert abs(S - a.calc.get_overlap()).max() < 1e-12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["orbitals"] == H.shape[0] and summary["method"] == "dense"
    assert summary["overlap_screen"] == 1e-8  # the calculator's default
    # the dense path reports the occupied levels along S's near-null directions
    assert summary["near_null_levels"] == int(a.calc.get_near_null_levels().max())
    out0 = tmp_path / "out0"  # GPAW's S to rounding, asked for on the command line
    args = ["predict", str(tmp_path / "ethanol.xyz"), "-m", str(ckpt), "-o", str(out0), "-q"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        assert main(args + ["--overlap-screen", "0"]) == 0
    assert json.loads((out0 / "summary.json").read_text())["overlap_screen"] == 0.0
    assert abs(sp.load_npz(out0 / "overlap.npz") - S).max() <= 1e-8
    bad = tmp_path / "bad"
    assert main(args[:-2] + [str(bad), "-q", "--overlap-screen", "-1"]) == 2
    assert not bad.exists()  # refused before anything was written
    out1 = tmp_path / "out1"  # canonical orthogonalisation: fewer bands, same H and S
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        assert main(args[:-2] + [str(out1), "-q", "--overlap-cutoff", "0.3"]) == 0
    assert json.loads((out1 / "summary.json").read_text())["overlap_cutoff"] == 0.3
    kept = int((np.linalg.eigvalsh(S.toarray()) >= 0.3).sum())
    assert 0 < kept < H.shape[0]
    assert len((out1 / "eigenvalues.csv").read_text().splitlines()) == 1 + kept
    assert main(args[:-2] + [str(bad), "-q", "--overlap-cutoff", "2"]) == 2
    assert not bad.exists()
    assert summary["fermi_level_eV"] == pytest.approx(a.calc.get_fermi_level())
    assert (out / "dos.png").stat().st_size > 10_000
    rows = (out / "eigenvalues.csv").read_text().splitlines()
    assert len(rows) == 1 + H.shape[0]
    assert main(["predict", str(tmp_path / "nope.xyz"), "-m", str(ckpt), "-o", str(out)]) == 2
    # KPM: the hole count integrated exactly from the species moments, with the stochastic
    # standard error of its random vectors; the written PDOS integrates to the same count
    km = tmp_path / "kpm"
    kargs = ["predict", str(tmp_path / "ethanol.xyz"), "-m", str(ckpt), "-o", str(km), "-q"]
    kargs += ["--emin", "-30", "--emax", "10", "--npts", "8001"]  # a fine grid to integrate
    assert main(kargs + ["--method", "kpm", "--holes", "C,H", "--hole-window", "3"]) == 0
    s3 = json.loads((km / "summary.json").read_text())
    assert s3["method"] == "kpm" and 0 < s3["holes"]["holes_stderr"] < 0.5 * s3["holes"]["holes"]
    table = np.loadtxt(km / "dos.csv", delimiter=",", skiprows=1)
    head = (km / "dos.csv").read_text().splitlines()[0].split(",")
    ef3 = s3["fermi_level_eV"]
    fine = np.linspace(ef3, ef3 + 3, 20001)
    pd = sum(np.interp(fine, table[:, 0], table[:, head.index(x)]) for x in ("C", "H"))
    assert s3["holes"]["holes"] == pytest.approx(2 * np.trapezoid(pd, fine), rel=2e-3)
    # --pdos holes: C+H as one row (KPM: one group, two moments per step), the same
    # random vectors: the same count and error as the sum of the species rows
    kh = tmp_path / "kpm_holes"
    hargs = [x if x != str(km) else str(kh) for x in kargs]
    hole_args = ["--method", "kpm", "--holes", "C,H", "--hole-window", "3"]
    assert main(hargs + hole_args + ["--pdos", "holes"]) == 0
    s5 = json.loads((kh / "summary.json").read_text())
    assert s3["pdos_rows"] == ["C", "O", "H"] and s5["pdos_rows"] == ["C+H"]
    assert (kh / "dos.csv").read_text().splitlines()[0] == "energy_eV,total,C+H"
    assert s5["holes"]["holes"] == pytest.approx(s3["holes"]["holes"], rel=1e-9)
    assert s5["holes"]["holes_stderr"] == pytest.approx(s3["holes"]["holes_stderr"], rel=1e-6)
    bad_pdos = tmp_path / "bad_pdos"  # refused before anything is written
    bargs = [x if x != str(km) else str(bad_pdos) for x in kargs]
    assert main(bargs + ["--method", "kpm", "--pdos", "holes"]) == 2  # without --holes
    assert main(bargs + hole_args + ["--pdos", "atoms"]) == 2
    assert not bad_pdos.exists()
    # above dense_limit E_F comes from KPM too: the error is a jackknife that includes
    # E_F's own; the count is still the written PDOS integrated from the written E_F
    import ase_gearsh.predict as predict_module

    small_limit = functools.partial(GearsHCalculator, dense_limit=10)
    monkeypatch.setattr(predict_module, "GearsHCalculator", small_limit)
    kj = tmp_path / "kpm_fermi"
    kargs[kargs.index(str(km))] = str(kj)
    assert main(kargs + ["--holes", "C,H", "--hole-window", "3"]) == 0
    s4 = json.loads((kj / "summary.json").read_text())
    assert s4["method"] == "kpm" and s4["holes"]["holes_stderr"] > 0
    table = np.loadtxt(kj / "dos.csv", delimiter=",", skiprows=1)
    fine = np.linspace(s4["fermi_level_eV"], s4["fermi_level_eV"] + 3, 20001)
    pd = sum(np.interp(fine, table[:, 0], table[:, head.index(x)]) for x in ("C", "H"))
    assert s4["holes"]["holes"] == pytest.approx(2 * np.trapezoid(pd, fine), rel=2e-3)
    monkeypatch.undo()
    if importlib.util.find_spec("pypardiso") is None:
        return
    # exact states near E_F: the same Fermi level and states as the dense run, and the
    # hole count as the sum of the C+H weights of the states in the window
    ex = tmp_path / "exact"
    args = ["predict", str(tmp_path / "ethanol.xyz"), "-m", str(ckpt), "-o", str(ex), "-q"]
    assert main(args + ["--method", "exact", "--holes", "C,H", "--hole-window", "3"]) == 0
    s2 = json.loads((ex / "summary.json").read_text())
    assert s2["method"] == "exact" and s2["near_null_levels"] is None
    assert s2["fermi_level_eV"] == pytest.approx(summary["fermi_level_eV"], abs=1e-6)
    assert s2["gap_eV"] == pytest.approx(summary["gap_eV"], abs=1e-6)
    eps = np.array([float(r.split(",")[-1]) for r in rows[1:]])
    ef = s2["fermi_level_eV"]
    states = np.loadtxt(ex / "states.csv", delimiter=",", skiprows=1, ndmin=2)
    np.testing.assert_allclose(states[:, 0], eps[(eps >= ef - 2) & (eps <= ef + 3)], atol=1e-6)
    cols = (ex / "states.csv").read_text().splitlines()[0].split(",")
    np.testing.assert_allclose(states[:, 1:].sum(axis=1), 1.0, atol=1e-5)  # weights per state
    hole = (states[:, 0] >= ef) & (states[:, 0] <= ef + 3)
    expected = 2 * states[hole][:, [cols.index("C"), cols.index("H")]].sum()
    assert hole.sum() > 0 and s2["holes"]["holes"] == pytest.approx(expected, abs=1e-4)
    assert s2["holes"]["holes_stderr"] is None  # exact: no stochastic error
    assert (ex / "dos.png").stat().st_size > 10_000
    assert main(args[:-2] + [str(tmp_path / "x2"), "--method", "exact", "--kpts", "2,2,2"]) == 2


def test_no_recompilation_for_sizes_within_a_bucket(model):
    import jax

    count = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: count.append(event) if "backend_compile" in event else None
    )
    first = molecule("CH3CH2OH")
    first.center(vacuum=3.0)
    first.calc = GearsHCalculator(model, warn_extrapolation=False)
    first.calc.get_hamiltonian()
    before = len(count)
    second = molecule("CH3OH")  # other atom, edge and bond counts, same buckets
    second.center(vacuum=3.0)
    second.calc = GearsHCalculator(model, warn_extrapolation=False)
    pb = second.calc.blocks()
    assert pb.timings["atoms_padded"] == first.calc.blocks().timings["atoms_padded"]
    assert len(pb.pair_i) != len(first.calc.blocks().pair_i)
    assert len(count) == before
    # the counter works: a size in the next bucket (>= 64 atoms) does compile
    cluster = Atoms()
    for k in range(8):
        w = molecule("CH3CH2OH")
        w.translate([6.0 * k, 0, 0])
        cluster += w
    cluster.center(vacuum=3.0)
    cluster.calc = GearsHCalculator(model, warn_extrapolation=False)
    assert cluster.calc.blocks().timings["atoms_padded"] == 128
    assert len(count) > before


# -- ASE calculator rules ---------------------------------------------------------------
def water(seed=0):
    a = molecule("H2O")
    a.rattle(0.03, seed=seed)
    a.center(vacuum=3.0)
    return a


def test_todict_round_trip(model, checkpoint, make_atoms):
    calc = GearsHCalculator(str(checkpoint), kpts=(1, 1, 4), width=0.05, warn_extrapolation=False)
    d = calc.todict()
    assert d == {
        "model": str(checkpoint),
        "kpts": (1, 1, 4),
        "width": 0.05,
        "warn_extrapolation": False,
    }
    twin = GearsHCalculator(**d)
    assert twin.todict() == d and twin.model is calc.model
    chain = make_atoms.chain
    atoms = chain()
    e1 = calc.get_property("eigenvalues", atoms)
    assert np.array_equal(twin.get_property("eigenvalues", atoms), e1)
    assert twin.get_property("fermi_level", atoms) == calc.get_property("fermi_level", atoms)
    # a Model object: todict records its checkpoint path (or the object without one)
    assert GearsHCalculator(calc.model).todict()["model"] == calc.model.path
    assert model.path is None and GearsHCalculator(model).todict()["model"] is model
    # a band path survives the round trip through its dict form
    from ase.dft.kpoints import BandPath

    path = BandPath(
        atoms.cell,
        kpts=[[0, 0, x] for x in np.linspace(0, 0.5, 5)],
        special_points={"G": [0, 0, 0], "Z": [0, 0, 0.5]},
        path="GZ",
    )
    bp = GearsHCalculator(model, kpts=path)
    again = GearsHCalculator(**bp.todict())
    assert isinstance(bp.todict()["kpts"], dict)
    assert np.allclose(again.parameters.kpts.kpts, path.kpts)


def test_get_property_for_any_atoms(model):
    w, m = water(), molecule("CH3OH")
    m.center(vacuum=3.0)
    calc = GearsHCalculator(model, warn_extrapolation=False)
    w.calc = calc
    ef_w = calc.get_fermi_level()
    ref_m = GearsHCalculator(model, warn_extrapolation=False)
    ef_m = calc.get_property("fermi_level", m)
    assert ef_m == ref_m.get_property("fermi_level", m) and ef_m != ef_w
    assert np.allclose(calc.atoms.positions, m.positions)  # results belong to calc.atoms
    assert calc.get_property("eigenvalues", m).shape == (
        1,
        1,
        calc.get_hamiltonian(atoms=m).shape[0],
    )
    # the getters follow the attached atoms again
    assert calc.get_fermi_level() == ef_w
    n_w = calc.get_number_of_bands()
    assert calc.get_hamiltonian().shape[0] == n_w < ref_m.get_number_of_bands()
    # calculate() honours its atoms argument; an unattached calculator keeps the last atoms
    free = GearsHCalculator(model, warn_extrapolation=False)
    free.calculate(m, ["fermi_level", "hamiltonian"])
    assert free.results["fermi_level"] == ef_m
    assert free.get_fermi_level() == ef_m
    assert free.get_number_of_bands() == ref_m.get_number_of_bands()
    free.calculate(w, ["eigenvalues"])
    assert "fermi_level" not in free.results and free.get_fermi_level() == ef_w


def test_fermi_level_does_not_depend_on_call_order(model, make_atoms):
    chain = make_atoms.chain
    atoms = chain()
    atoms.rattle(0.02, seed=4)
    kw = dict(kpts=(1, 1, 4), warn_extrapolation=False)
    first = GearsHCalculator(model, **kw)
    atoms.calc = first
    ef, eps = first.get_fermi_level(), first.get_eigenvalues(kpt=1)
    first.get_pdos(width=0.2)
    last = GearsHCalculator(model, **kw)
    atoms.calc = last
    last.get_pdos(width=0.05, by="atom")
    last.get_dos(width=0.3)
    assert np.array_equal(last.get_eigenvalues(kpt=1), eps)
    assert last.get_fermi_level() == ef
    # KPM (above dense_limit): always from the total DOS at kpm['fermi_width']
    big = chain().repeat((1, 1, 6))
    big.rattle(0.02, seed=5)
    kw = dict(dense_limit=0, warn_extrapolation=False, kpm={"n_random": 8, "seed": 2})
    a = GearsHCalculator(model, **kw)
    ef_a = a.get_property("fermi_level", big)
    a.get_dos(width=0.3)
    b = GearsHCalculator(model, **kw)
    b.get_property("hamiltonian", big)
    b.get_dos(width=0.3)
    b.get_pdos(width=0.5, by="atom")
    assert b.get_fermi_level() == ef_a == a.get_fermi_level()
    # kpm and width settings move the Fermi level, the matrices stay
    H = b.get_hamiltonian()
    b.set(kpm={"n_random": 8, "seed": 3})
    assert b.get_hamiltonian() is H and b.get_fermi_level() != ef_a


def test_bz_and_ibz_k_points(model):
    from ase.build import graphene

    sheet = graphene(formula="C2", vacuum=5.0)
    calc = GearsHCalculator(model, kpts=(2, 2, 1), warn_extrapolation=False)
    sheet.calc = calc
    assert calc.get_bz_k_points().shape == (4, 3)
    assert len(calc.get_ibz_k_points()) == 2  # (1/4, 1/4) ~ (-1/4, -1/4) ...
    assert np.allclose(calc.get_k_point_weights(), [0.5, 0.5])
    calc.set(kpts={"size": (4, 4, 1), "gamma": True})
    bz, ibz, w = calc.get_bz_k_points(), calc.get_ibz_k_points(), calc.get_k_point_weights()
    assert bz.shape == (16, 3) and ibz.shape == (10, 3)  # 4 TRIM points + 12 / 2
    assert w.sum() == pytest.approx(1.0) and sorted(set(np.round(16 * w))) == [1.0, 2.0]
    bz2ibz = calc.get_bz_to_ibz_map()

    def same(x, y):  # equal modulo reciprocal lattice vectors
        return np.all(np.abs(x - y - np.round(x - y)) < 1e-9, axis=1)

    # every k is its IBZ point or that point's time-reversed partner
    assert np.all(same(ibz[bz2ibz], bz) | same(-ibz[bz2ibz], bz))
    assert np.allclose(np.bincount(bz2ibz) / 16, w)
    # a list of k-points is kept as given, in both
    pts = [[0, 0, 0], [0.25, 0, 0], [-0.25, 0, 0]]
    calc.set(kpts=pts)
    assert np.allclose(calc.get_bz_k_points(), pts) and np.allclose(calc.get_ibz_k_points(), pts)


def test_occupation_numbers_and_ase_tools(model, water_dataset, make_atoms):
    from ase.dft.bandgap import bandgap
    from ase.dft.dos import DOS

    chain = make_atoms.chain
    s = Dataset(water_dataset)[0]
    atoms, calc = oracle_calc(model, s)
    occ = calc.get_occupation_numbers()
    assert occ.shape == (calc.get_number_of_bands(),)
    assert occ.sum() == pytest.approx(calc.get_number_of_electrons(), abs=1e-8)
    assert np.allclose(occ[:4], 2.0) and np.allclose(occ[4:], 0.0)
    assert calc.get_spin_polarized() is False and calc.get_number_of_spins() == 1
    gap, p1, p2 = bandgap(calc)
    eps = calc.get_eigenvalues()
    assert gap == pytest.approx(eps[4] - eps[3]) and p1 == (0, 0, 3) and p2 == (0, 0, 4)
    # a metal-like chain with k-points: weighted occupations hold the electrons
    c = chain()
    c.calc = GearsHCalculator(model, kpts=(1, 1, 6), width=0.1, warn_extrapolation=False)
    w = c.calc.get_k_point_weights()
    total = sum(wk * c.calc.get_occupation_numbers(kpt=q).sum() for q, wk in enumerate(w))
    assert total == pytest.approx(c.calc.get_number_of_electrons(), abs=1e-8)
    occ = np.concatenate([c.calc.get_occupation_numbers(kpt=q) for q in range(len(w))])
    assert occ.min() >= 0.0 and occ.max() <= 2.0
    d = DOS(c.calc, width=0.5, npts=8001)
    assert np.trapezoid(d.get_dos(), d.get_energies()) == pytest.approx(
        2 * c.calc.get_number_of_bands(), rel=1e-3
    )
    bandgap(c.calc)  # runs on k-points


def test_band_structure_plot_with_ase(model, make_atoms, tmp_path):
    """ASE's own band-structure tools on a BandPath: ``calc.band_structure().plot()``
    draws the bands, labelled special points included, and ``BandStructure.write``
    round-trips them."""
    from ase.spectrum.band_structure import BandStructure

    from ase_gearsh.core.io import new_figure, save_figure

    c = make_atoms.chain()
    path = c.cell.bandpath(npoints=12, pbc=c.pbc)  # G-X along the chain
    c.calc = GearsHCalculator(model, kpts=path, warn_extrapolation=False)
    bs = c.calc.band_structure(reference=0.0)
    assert bs.energies.shape == (1, 12, c.calc.get_number_of_bands())
    assert np.allclose(bs.energies[0, 7], c.calc.get_eigenvalues(kpt=7))
    fig, ax = new_figure()
    ax = bs.plot(ax=ax, emin=-15, emax=10)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == 2 and "Gamma" in labels[0]  # ASE names the end by its axis
    assert len(ax.get_lines()) >= bs.energies.shape[2]
    save_figure(fig, tmp_path / "bands.png")
    assert (tmp_path / "bands.png").stat().st_size > 5_000
    bs.write(tmp_path / "bands.json")
    again = BandStructure.read(tmp_path / "bands.json")
    assert np.allclose(again.energies, bs.energies)


def test_loaded_models_are_shared(checkpoint):
    import time

    first = GearsHCalculator(str(checkpoint))
    t = time.perf_counter()
    second = GearsHCalculator(checkpoint)
    assert time.perf_counter() - t < 0.5
    assert second.model is first.model and second.predictor is first.predictor
    a, b = water(1), water(2)
    a.calc, b.calc = first, second
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        assert first.get_overlap().shape == second.get_overlap().shape


def test_bad_input_raises_clear_errors(model, make_atoms):
    for err in (CalculatorInputError, PropertyUnavailableError):
        assert issubclass(err, GearsHError)
    assert issubclass(CalculatorInputError, CalculatorSetupError)
    assert issubclass(PropertyUnavailableError, PropertyNotPresent)
    calc = GearsHCalculator(model, warn_extrapolation=False)
    with pytest.raises(CalculatorInputError, match="expected at least one atom, got an empty"):
        calc.get_property("eigenvalues", Atoms())
    nan = water()
    nan.positions[1, 2] = np.nan
    with pytest.raises(CalculatorInputError, match=r"expected finite positions.*\[1\]"):
        calc.get_property("hamiltonian", nan)
    with pytest.raises(CalculatorInputError, match="no atoms: attach the calculator"):
        calc.get_fermi_level()
    with pytest.raises(
        CalculatorInputError,
        match="model must be a checkpoint path or an ase_gearsh Model, got int",
    ):
        GearsHCalculator(3)
    with pytest.raises(CalculatorInputError, match="a model is required"):
        GearsHCalculator()
    cases = [
        (dict(kpts=(2, 2)), r"kpts must be None.*got tuple of shape \(2,\)"),
        (dict(kpts=(0, 1, 1)), r"three positive integers.*got \[0, 1, 1\]"),
        (dict(kpts=[[0, 0]]), r"\(n, 3\) array.*got list of shape \(1, 2\)"),
        (dict(kpts={"size": (2, 2, 1), "shift": 1}), r"unknown key\(s\) \['shift'\]"),
        (dict(kpts={"gamma": True}), "needs 'size', 'density' or 'path'"),
        (dict(width=0.0), r"width .* must be a finite number > 0, got 0.0"),
        (dict(width=-0.1), "> 0, got -0.1"),
        (dict(dense_limit=-1), "dense_limit must be an integer >= 0, got -1"),
        (dict(kpm={"n_random": 0}), r"kpm\['n_random'\] must be an integer > 0, got 0"),
        (dict(kpm={"moments": 5}), r"kpm: unknown key\(s\) \['moments'\]"),
    ]
    for kw, match in cases:
        with pytest.raises(CalculatorInputError, match=match):
            GearsHCalculator(model, **kw)
        with pytest.raises(CalculatorInputError, match=match):
            calc.set(**kw)
    w = water()
    w.calc = calc
    with pytest.raises(CalculatorInputError, match="npts must be an integer >= 2, got 1"):
        calc.get_dos(npts=1)
    with pytest.raises(
        CalculatorInputError,
        match=r"width \(DOS broadening, eV\) must be a "
        r"finite number > 0, got 0",
    ):
        calc.get_pdos(width=0)
    with pytest.raises(CalculatorInputError, match="need emin < emax, got emin=1, emax=0"):
        calc.get_dos(emin=1, emax=0)
    with pytest.raises(CalculatorInputError, match="method must be 'auto', 'dense' or 'kpm'"):
        calc.get_dos(method="lanczos")
    with pytest.raises(CalculatorInputError, match=r"spin must be 0 .* got 1"):
        calc.get_eigenvalues(spin=1)
    with pytest.raises(
        CalculatorInputError,
        match=r"index must be an integer in \[0, 1\), "
        r"got 3",
    ):
        calc.get_eigenvalues(kpt=3)
    with pytest.raises(CalculatorInputError, match="components along non-periodic"):
        calc.get_hamiltonian(kpt=[0.0, 0.0, 0.25])
    calc.set(dense_limit=5)
    with pytest.raises(PropertyUnavailableError, match=r"\d+ orbitals exceed dense_limit=5"):
        calc.get_eigenvalues()
    chain = make_atoms.chain
    c = chain()
    c.calc = GearsHCalculator(model, kpts=(1, 1, 4), dense_limit=0, warn_extrapolation=False)
    with pytest.raises(PropertyUnavailableError, match="at Gamma only"):
        c.calc.get_dos()


def test_hole_count_integrates_the_projected_dos():
    from ase_gearsh.predict import PredictError, hole_count

    e = np.linspace(-5, 5, 1001)
    pdos = {"W": np.ones_like(e), "Se": np.where(e > 1.0, 3.0, 0.5), "Hf": 10 * np.ones_like(e)}
    # two spins x (1 + 0.5) states/eV x 0.2 eV
    assert hole_count(e, pdos, 0.3, ["W", "Se"], 0.2) == pytest.approx(0.6)
    # a step from 0.5 to 3 at 1.0 eV, linear between grid points 0.01 eV apart
    expected = 2 * (0.1 * 0.5 + 0.01 * 1.75 + 0.09 * 3.0)
    assert hole_count(e, pdos, 0.9, ["Se"], 0.2) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(PredictError, match="does not cover E_F to E_F"):
        hole_count(e, pdos, 4.9, ["W"], 0.2)


def test_batch_predict_resumes_in_parallel_and_summarises(checkpoint, tmp_path, capsys):
    """`gearsh predict A B C -o OUT --jobs 2`: one folder per structure, finished ones
    skipped on a re-run, a failing structure isolated (exit 1), summary.csv with E_F,
    gap and holes."""
    import csv

    from ase.io import write

    from ase_gearsh.cli import main

    names = []
    for k, formula in enumerate(["H2O", "H2O", "H2O"]):  # one size: one compilation
        a = molecule(formula)
        a.rattle(0.05, seed=k)
        a.center(vacuum=3.0)
        names.append(tmp_path / f"m{k}_{formula}.xyz")
        write(names[-1], a)
    bad = molecule("H2O")
    bad.symbols[0] = "Au"
    bad.center(vacuum=3.0)
    write(tmp_path / "gold.xyz", bad)
    out = tmp_path / "out"
    common = ["-m", str(checkpoint), "-o", str(out), "-q", "--holes", "O", "--hole-window", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = ["predict", str(names[0]), *common[:2], "-o", str(out / names[0].stem)]
        assert main([*first, *common[5:]]) == 0  # the same options, one structure
        capsys.readouterr()
        code = main(
            ["predict", *map(str, names), str(tmp_path / "gold.xyz"), *common, "--jobs", "2"]
        )
    text = capsys.readouterr()
    assert code == 1 and "gold" in text.err and "Au" in text.err
    assert "4 structures: 1 already done, 3 to predict with 2 process(es)" in text.out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(n.stem for n in names)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["structure"] for r in rows] == [n.stem for n in names]
    for r, n in zip(rows, names):
        s = json.loads((out / n.stem / "summary.json").read_text())
        assert float(r["fermi_level_eV"]) == pytest.approx(s["fermi_level_eV"])
        assert s["holes"]["species"] == ["O"] and s["holes"]["per_cm2"] is None  # molecule
        assert float(r["holes"]) == pytest.approx(s["holes"]["holes"]) and s["holes"]["holes"] >= 0
        assert float(r["gap_eV"]) > 0
    # a re-run skips all finished structures and only retries the failure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["predict", *map(str, names), str(tmp_path / "gold.xyz"), *common]) == 1
    assert "4 structures: 3 already done, 1 to predict" in capsys.readouterr().out
