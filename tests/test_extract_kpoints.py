"""Real-space blocks H(R) from k-sampled runs, checked against GPAW."""

import numpy as np
import pytest

from ase_gearsh.core.data import Dataset
from gpaw_tools.extract import extract, extract_files, main
from gpaw_tools.interactions import AliasingError


def test_off_grid_k_matches_gpaw_fixed_density(chain_kpts, tmp_path):
    path, k_off, eps_ref = chain_kpts
    written, _, failed = extract_files([path], tmp_path, progress=False)
    assert not failed
    s = Dataset(tmp_path)[0]
    assert s.meta["kgrid"] == [1, 1, 13]
    eps = s.eigenvalues(kpt=k_off)[: len(eps_ref)]
    assert np.abs(eps - eps_ref).max() < 1e-6
    # and at the grid points the matrices are GPAW's own
    from gpaw import GPAW
    from gpaw.lcao.tools import get_lcao_hamiltonian

    calc = GPAW(str(path), txt=None)
    H, S = get_lcao_hamiltonian(calc)
    for q, kpt in enumerate(calc.get_ibz_k_points()):
        np.testing.assert_allclose(s.hamiltonian(kpt), H[0, q], atol=1e-10)
        np.testing.assert_allclose(s.overlap(kpt), S[q], atol=1e-12)
    assert s.meta["checks"]["max_imaginary_part"] < 1e-10


def test_blocks_vanish_outside_the_h_range(chain_kpts):
    """Fourier transform to every R the grid resolves: nothing outside the kept set."""
    path, _, _ = chain_kpts
    from gpaw import GPAW
    from gpaw.lcao.tools import get_lcao_hamiltonian

    arrays, meta = extract(path)
    calc = GPAW(str(path), txt=None)
    H, _ = get_lcao_hamiltonian(calc)
    k = calc.get_ibz_k_points()[:, 2]
    off = np.concatenate([[0], np.cumsum(arrays["orbital_counts"])])
    kept = {(i, j, R[2]) for (i, j), R in zip(arrays["pair_ij"], arrays["pair_shift"])}
    kept |= {(j, i, -R) for (i, j, R) in kept} | {(i, i, 0) for i in range(4)}
    outside = 0.0
    beyond_basis = 0.0
    rc = {sym: max(b["rc"]) for sym, b in meta["basis"].items()}
    sym = calc.get_atoms().get_chemical_symbols()
    pos, cell = arrays["positions"], arrays["cell"]
    for R in range(-6, 7):
        HR = np.einsum("k,kmn->mn", np.exp(-2j * np.pi * k * R), H[0]) / len(k)
        for i in range(4):
            for j in range(4):
                m = np.abs(HR[off[i] : off[i + 1], off[j] : off[j + 1]]).max()
                d = np.linalg.norm(pos[j] + R * cell[2] - pos[i])
                if (i, j, R) not in kept:
                    outside = max(outside, m)
                elif d > rc[sym[i]] + rc[sym[j]]:
                    beyond_basis = max(beyond_basis, m)
    print(
        f"largest |H_ij(R)| outside the kept set {outside:.1e} eV, "
        f"beyond the basis spheres {beyond_basis:.1e} eV"
    )
    assert outside < 1e-10  # measured: 1e-14 eV (round-off)
    # PAW projectors: H reaches (weakly) beyond the basis spheres; measured 1.1e-7 eV
    assert beyond_basis > 1e-9


def test_gamma_cell_too_small(chain_gamma_gpw, tmp_path):
    with pytest.raises(AliasingError, match=r"at most one image.*supercell repeated"):
        extract(chain_gamma_gpw)
    assert main([str(chain_gamma_gpw), "-o", str(tmp_path), "-q"]) == 1
    assert not list(tmp_path.glob("*.npz"))


def test_kgrid_too_coarse(chain_coarse_gpw):
    with pytest.raises(
        AliasingError, match=r"grid \(1, 1, 3\) is too coarse.*at least \(1, 1, \d+\)"
    ):
        extract(chain_coarse_gpw)


def test_time_reversal_reduced_grid_is_unfolded(chain_time_reversal_gpw, chain_kpts):
    path_full, k_off, eps_ref = chain_kpts
    reduced, meta = extract(chain_time_reversal_gpw)
    assert len(reduced["kpts"]) == 7  # IBZ of 13 points with k -> -k
    from ase_gearsh.core.data import Structure

    s = Structure(reduced, meta)
    eps = s.eigenvalues(kpt=k_off)[: len(eps_ref)]
    # same physics as the full-grid run, up to SCF convergence of the two runs
    assert np.abs(eps - eps_ref).max() < 1e-3
    assert meta["checks"]["max_eigenvalue_error"] < 1e-8
