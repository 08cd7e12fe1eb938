"""GearsHCalculator: physics against GPAW (oracle blocks), symmetry, DOS, errors."""
import json
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import CalculatorSetupError, PropertyNotPresent

from ase_gearsh import GearsHCalculator
from ase_gearsh.model.checkpoint import CheckpointError, save_checkpoint
from ase_gearsh.model.coverage import ExtrapolationWarning, training_coverage
from ase_gearsh.core.data import Dataset
from ase_gearsh.core.basis import RegistryError


class Oracle:
    """Stands in for the network: returns the dataset's GPAW blocks."""

    def __init__(self, structure):
        self.s = structure

    def __call__(self, atoms, progress=False):
        assert np.allclose(atoms.positions, self.s.atoms.positions)
        return self.s.blocks("H")


@pytest.fixture(scope="module")
def model(small_model, water_dataset, chain_dataset):
    """The small random model with basis functions and training coverage attached."""
    from gpaw_tools.overlap import basis_for_registry
    m = small_model
    m.basis_data = {k: v.to_dict() for k, v in
                    basis_for_registry(m.registry, "PBE", "paw").items()}
    structures = list(Dataset(water_dataset)) + list(Dataset(chain_dataset))
    graphs = [m.graph(s.atoms) for s in structures]
    m.coverage = training_coverage(graphs, m.registry.n_species)
    return m


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
    assert np.abs(eps[:len(ref)] - ref).max() < 1e-6
    assert calc.get_number_of_electrons() == 8.0
    homo, lumo = eps[3], eps[4]
    assert calc.get_fermi_level() == pytest.approx(0.5 * (homo + lumo), abs=1e-9)
    assert isinstance(calc.results["hamiltonian"], sp.csr_matrix)


def test_oracle_eigenvalues_equal_gpaw_at_every_kpoint(model, chain_dataset, chain_kpts):
    s = Dataset(chain_dataset)[0]
    kpts = s.reference_kpts
    atoms, calc = oracle_calc(model, s, kpts=kpts)
    assert len(calc.get_ibz_k_points()) == len(kpts)
    for q in range(len(kpts)):
        ref = s.reference_eigenvalues[0, q]
        assert np.abs(calc.get_eigenvalues(kpt=q)[:len(ref)] - ref).max() < 1e-6
    # an off-grid k against GPAW's fixed-density run: H(R) and S(R) from all images
    _, k_off, eps_ref = chain_kpts
    atoms, calc = oracle_calc(model, s, kpts=[k_off])
    assert np.abs(calc.get_eigenvalues(kpt=0)[:len(eps_ref)] - eps_ref).max() < 1e-6
    S_k = calc.get_overlap(kpt=k_off)
    assert np.abs(S_k.toarray() - s.overlap(kpt=k_off)).max() < 1e-8


def test_gamma_of_supercell_equals_folded_kpoints(model):
    """Model H of a 3x supercell at Gamma has the primitive eigenvalues at k = 0, +-1/3."""
    from conftest import chain
    prim = chain()
    calc = GearsHCalculator(model, kpts=[[0, 0, 0], [0, 0, 1 / 3], [0, 0, -1 / 3]],
                            warn_extrapolation=False)
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
    l_per_atom = [model.registry.species[s - 1]["l"] for s in
                  model.registry.species_index(a.numbers)]
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
    # ASE's DOS tool works on the calculator (it counts both spins of a spin-paired run)
    from ase.dft.dos import DOS
    d = DOS(calc, width=0.1, npts=801)
    assert np.trapezoid(d.get_dos(), d.get_energies()) == pytest.approx(2 * n, rel=1e-3)


def test_kpm_dos_matches_dense(model):
    """Kernel polynomial DOS and PDOS against dense diagonalisation (periodic chain)."""
    from conftest import chain
    atoms = chain().repeat((1, 1, 8))
    atoms.rattle(0.02, seed=1)
    kw = dict(warn_extrapolation=False, kpm={"n_moments": 400, "n_random": 64, "seed": 1})
    atoms.calc = GearsHCalculator(model, **kw)
    eps = atoms.calc.get_eigenvalues()
    lo, hi = eps.min() - 5, eps.max() + 5
    e, dense = atoms.calc.get_dos(width=0.3, method="dense", npts=3001, emin=lo, emax=hi)
    _, kpm = atoms.calc.get_dos(width=0.3, method="kpm", npts=3001, emin=lo, emax=hi)
    n = atoms.calc.get_number_of_bands()
    assert np.trapezoid(kpm, e) == pytest.approx(n, rel=0.01)
    de = e[1] - e[0]
    err = np.abs(np.cumsum(dense) * de - np.cumsum(kpm) * de).max()
    assert err < 0.03 * n, (err, n, lo, hi)
    _, pk = atoms.calc.get_pdos(width=0.3, method="kpm", npts=3001, emin=lo, emax=hi)
    assert set(pk) == {"C", "H"}
    assert np.abs(sum(pk.values()) - kpm).max() < 1e-8 * max(1.0, kpm.max())
    # the KPM Fermi level (a calculator with KPM above 10 orbitals) lies between HOMO
    # and LUMO, up to the KPM resolution
    mom = atoms.calc.kpm_moments(0.3)
    assert mom.moments.shape[1] == 400
    resolution = np.pi * mom.half_width / 400
    n_occ = int(round(atoms.calc.get_number_of_electrons() / 2))
    kpm_calc = GearsHCalculator(model, dense_limit=10, **kw)
    ef_kpm = kpm_calc.get_property("fermi_level", atoms)
    assert kpm_calc.uses_kpm() and not atoms.calc.uses_kpm()
    assert eps[n_occ - 1] - 2 * resolution <= ef_kpm <= eps[n_occ] + 2 * resolution, \
        (ef_kpm, eps[n_occ - 1], eps[n_occ], resolution)


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
    with pytest.raises(RegistryError, match="element Si is not known to this model; it was "
                                            "trained on H, C, O"):
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
    # a model without basis functions cannot give S, and says how to fix it
    data, model.basis_data = model.basis_data, None
    try:
        w.calc = GearsHCalculator(model)
        with pytest.raises(PropertyNotPresent, match="gearsh attach-basis"):
            w.calc.get_overlap()
    finally:
        model.basis_data = data


def test_predict_cli_writes_matrices_spectrum_and_plot(model, tmp_path):
    import jax
    from ase.io import read, write

    from ase_gearsh.cli import main
    ckpt = tmp_path / "model.ckpt"
    save_checkpoint(ckpt, config=model.config, settings=model.settings,
                    registry=model.registry.to_dict(),
                    stats={k: np.asarray(v) for k, v in model.stats.items()},
                    params=jax.device_get(model.params), extra={"coverage": model.coverage},
                    basis=model.basis_data)
    a = molecule("CH3CH2OH")
    a.rattle(0.02, seed=3)
    a.center(vacuum=3.0)
    write(tmp_path / "ethanol.xyz", a)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        assert main(["predict", str(tmp_path / "ethanol.xyz"), "-m", str(ckpt), "-o", str(out),
                     "-q"]) == 0
    H = sp.load_npz(out / "hamiltonian.npz")
    S = sp.load_npz(out / "overlap.npz")
    a = read(tmp_path / "ethanol.xyz")  # positions as rounded in the file
    a.calc = GearsHCalculator(str(ckpt), warn_extrapolation=False)
    assert abs(H - a.calc.get_hamiltonian()).max() < 2e-5  # float32 network
    assert abs(S - a.calc.get_overlap()).max() < 1e-12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["orbitals"] == H.shape[0] and summary["method"] == "dense"
    assert summary["fermi_level_eV"] == pytest.approx(a.calc.get_fermi_level())
    assert (out / "dos.png").stat().st_size > 10_000
    rows = (out / "eigenvalues.csv").read_text().splitlines()
    assert len(rows) == 1 + H.shape[0]
    assert main(["predict", str(tmp_path / "nope.xyz"), "-m", str(ckpt), "-o",
                 str(out)]) == 2


def test_no_recompilation_for_sizes_within_a_bucket(model):
    import jax
    count = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: count.append(event) if "backend_compile" in event
        else None)
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
