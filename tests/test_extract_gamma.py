"""Gamma-point extraction from molecules: blocks rebuild GPAW's H, S and eigenvalues."""

import numpy as np
import pytest
from scipy.linalg import eigh

from ase_gearsh.core.data import Dataset
from gpaw_tools.extract import VerificationError, extract, extract_files, main


def _gpaw_matrices(path):
    from gpaw import GPAW
    from gpaw.lcao.tools import get_lcao_hamiltonian

    calc = GPAW(str(path), txt=None)
    H, S = get_lcao_hamiltonian(calc)
    return calc, np.asarray(H), np.asarray(S)


def test_molecule_eigenvalues_match_gpaw(h2o_gpw, tmp_path):
    assert main([str(h2o_gpw), "-o", str(tmp_path / "ds"), "-q"]) == 0
    ds = Dataset(tmp_path / "ds")
    assert len(ds) == 1
    s = ds[0]
    calc, H, S = _gpaw_matrices(h2o_gpw)
    # the reassembled matrices are GPAW's, element by element
    np.testing.assert_allclose(s.hamiltonian(), H[0, 0], atol=1e-10)
    np.testing.assert_allclose(s.overlap(), S[0], atol=1e-12)
    eps = calc.get_eigenvalues()
    mine = s.eigenvalues()[: len(eps)]
    assert np.abs(mine - eps).max() < 1e-6
    np.testing.assert_allclose(s.reference_eigenvalues[0, 0], eps)
    assert s.fermi_level == pytest.approx(calc.get_fermi_level())
    assert s.n_electrons == 8
    assert s.total_energy == pytest.approx(calc.get_potential_energy())
    assert s.atoms.get_chemical_formula() == "H2O"
    np.testing.assert_allclose(s.atoms.positions, calc.get_atoms().positions, atol=1e-10)


def test_metadata_is_complete(h2o_gpw, tmp_path):
    arrays, meta = extract(h2o_gpw)
    assert meta["basis"]["O"]["l"] == [0, 1, 2]
    assert meta["basis"]["H"]["l"] == [0, 1]
    assert meta["basis"]["O"]["name"] == "szp(dzp)"
    assert meta["basis"]["H"]["rc"][0] == pytest.approx(3.398, abs=0.01)  # Angstrom
    assert meta["xc"] == "PBE"
    assert meta["h"] == 0.2
    assert meta["kgrid"] == [1, 1, 1]
    assert meta["nspins"] == 1
    assert len(meta["source"]["sha256"]) == 64
    assert meta["gpaw"]["version_reader"]
    assert meta["source"]["gpaw_version_writer"]
    assert meta["block_threshold"] is None
    assert meta["checks"]["max_eigenvalue_error"] < 1e-8
    assert list(arrays["orbital_counts"]) == [9, 4, 4]
    # every unordered pair of the molecule is kept, in canonical orientation
    assert arrays["pair_ij"].tolist() == [[0, 1], [0, 2], [1, 2]]
    np.testing.assert_allclose(
        arrays["pair_vector"][0], arrays["positions"][1] - arrays["positions"][0]
    )


def test_pair_block_symmetry(h2o_gpw):
    arrays, meta = extract(h2o_gpw)
    from ase_gearsh.core.data import Structure

    s = Structure(arrays, dict(meta, format="gearsh-hamiltonian-dataset", schema_version=1))
    H = s.hamiltonian()
    np.testing.assert_array_equal(H, H.T)
    for blk in s.onsite_blocks("H"):
        np.testing.assert_allclose(blk, blk.T, atol=1e-12)
    # sparse and dense agree
    np.testing.assert_array_equal(s.hamiltonian(sparse=True).toarray(), H)


def test_classic_calculator_file(classic_h2o_gpw):
    from gpaw.calculator import GPAW as ClassicGPAW

    arrays, meta = extract(classic_h2o_gpw)
    eps = ClassicGPAW(str(classic_h2o_gpw), txt=None).get_eigenvalues()
    from ase_gearsh.core.data import assemble

    H = assemble(
        arrays["orbital_counts"],
        arrays["onsite_H"][0],
        arrays["pair_ij"],
        arrays["pair_shift"],
        arrays["pair_H"][0],
    )
    S = assemble(
        arrays["orbital_counts"],
        arrays["onsite_S"],
        arrays["pair_ij"],
        arrays["pair_shift"],
        arrays["pair_S"],
    )
    assert np.abs(eigh(H, S, eigvals_only=True)[: len(eps)] - eps).max() < 1e-6


def test_spin_polarised_stores_both_channels(spin_gpw, tmp_path):
    from gpaw import GPAW

    extract_files([spin_gpw], tmp_path, progress=False)
    s = Dataset(tmp_path)[0]
    assert s.nspins == 2
    calc = GPAW(str(spin_gpw), txt=None)
    for spin in (0, 1):
        eps = calc.get_eigenvalues(spin=spin)
        assert np.abs(s.eigenvalues(spin=spin)[: len(eps)] - eps).max() < 1e-6
    up, down = s.hamiltonian(spin=0), s.hamiltonian(spin=1)
    assert np.abs(up - down).max() > 0.1  # the channels really differ
    with pytest.raises(IndexError, match="2 spin channel"):
        s.hamiltonian(spin=2)


def test_threshold_is_recorded_and_applied(h2o_gpw):
    full, _ = extract(h2o_gpw)
    # dropping every pair block breaks the eigenvalues: refused unless asked for
    with pytest.raises(
        VerificationError,
        match=r"rebuild GPAW's eigenvalues only to .* eV "
        r"with --threshold 1e\+?0?9 eV .*expected <= 0.001 eV",
    ):
        extract(h2o_gpw, threshold=1e9)
    cut, meta = extract(h2o_gpw, threshold=1e9, eigenvalue_tolerance=np.inf)
    assert meta["block_threshold"] == 1e9
    assert meta["checks"]["max_eigenvalue_error"] > 0.1  # the effect is recorded
    assert len(cut["pair_ij"]) == 0 and len(full["pair_ij"]) == 3
    # a threshold that keeps every block passes the default check
    kept, meta = extract(h2o_gpw, threshold=1e-6)
    assert len(kept["pair_ij"]) == 3 and meta["checks"]["max_eigenvalue_error"] < 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, "x"])
def test_threshold_must_be_finite_and_non_negative(h2o_gpw, tmp_path, bad):
    with pytest.raises(ValueError, match="threshold must be a .*number of eV >= 0"):
        extract(h2o_gpw, threshold=bad)
    if isinstance(bad, float):
        assert main([str(h2o_gpw), "-o", str(tmp_path / "ds"), "--threshold", str(bad), "-q"]) == 2
        assert not (tmp_path / "ds").exists() or not list((tmp_path / "ds").glob("*.npz"))


def test_damaged_hamiltonian_is_refused_and_counted_as_failed(
    h2o_gpw, tmp_path, capsys, monkeypatch
):
    """A run whose stored H does not give its own eigenvalues (as a .gpw with a
    damaged potential does) is refused, counted as failed, and nothing is written."""
    import gpaw.lcao.tools as tools

    real = tools.get_lcao_hamiltonian

    def damaged(calc):
        H, S = real(calc)
        H = np.array(H)
        H[..., 0, 0] += 0.5  # eV
        return H, S

    monkeypatch.setattr(tools, "get_lcao_hamiltonian", damaged)
    out = tmp_path / "ds"
    assert main([str(h2o_gpw), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "rebuild GPAW's eigenvalues only to" in err and "expected <= 0.001 eV" in err
    assert list(out.glob("*.npz")) == []
