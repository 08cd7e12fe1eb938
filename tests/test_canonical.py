"""Canonical orthogonalisation (``overlap_cutoff``): near-linear dependences of the basis
left out of the dense eigenproblem, against GPAW's eigenvalues and a basis with a known
near-duplicate function."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la

from ase_gearsh.core.data import Dataset
from ase_gearsh.electronic.dense import ElectronicError, overlap_rank, solve_dense
from ase_gearsh.electronic.spectrum import DenseSpectrum, OrbitalLabels


def near_duplicate_basis(eps=1e-3, n_grid=60, m=12, seed=0):
    """H and S of m functions on a grid and one more, f_1 + eps r (nearly the first):
    S has one eigenvalue of order eps^2; also H and S of the m functions alone."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n_grid, m))
    extra = A[:, :1] + eps * rng.standard_normal((n_grid, 1))
    B = np.hstack([A, extra])
    B /= np.linalg.norm(B, axis=0)
    h = rng.standard_normal((n_grid, n_grid))
    h = 0.5 * (h + h.T)
    return B.T @ h @ B, B.T @ B, B[:, :m].T @ h @ B[:, :m], B[:, :m].T @ B[:, :m]


def test_a_zero_cutoff_is_the_full_problem():
    H, S, _, _ = near_duplicate_basis()
    e, _ = solve_dense(H, S)
    e0, _ = solve_dense(H, S, overlap_cutoff=0.0)
    np.testing.assert_array_equal(e, e0)
    np.testing.assert_allclose(e, la.eigh(H, S, eigvals_only=True), atol=1e-12)


def test_the_near_duplicate_direction_is_removed_and_errors_are_not_amplified():
    H, S, Hm, Sm = near_duplicate_basis()
    lam = la.eigvalsh(S)
    assert lam[0] < 1e-5 < lam[1]  # one near-linear dependence
    assert overlap_rank(S, 1e-4) == len(S) - 1
    e, _ = solve_dense(H, S, overlap_cutoff=1e-4)
    assert len(e) == len(S) - 1
    # what is left spans the m functions to O(eps): their eigenvalues, nearly
    em = la.eigh(Hm, Sm, eigvals_only=True)
    assert np.abs(e - em).max() < 0.05 * np.ptp(em)
    # an error of H (as a model's) moves the levels of the full problem far more than
    # its size; without the near-null direction, by about its size
    rng = np.random.default_rng(1)
    dH = rng.standard_normal(H.shape) * 1e-3
    dH = 0.5 * (dH + dH.T)
    full_shift = np.abs(solve_dense(H + dH, S)[0] - solve_dense(H, S)[0]).max()
    cut_shift = np.abs(solve_dense(H + dH, S, overlap_cutoff=1e-4)[0] - e).max()
    assert cut_shift < 0.02  # ||dH|| is about 0.013
    assert full_shift > 10 * cut_shift


def test_mulliken_weights_with_a_cutoff_sum_to_one():
    H, S, _, _ = near_duplicate_basis()
    groups = np.zeros((2, len(S)))
    groups[0, :6], groups[1, 6:] = 1, 1
    e, w = solve_dense(H, S, groups=groups, overlap_cutoff=1e-4)
    assert w.shape == (2, len(e))
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-10)


@pytest.mark.parametrize("bad", [-1e-3, 1.0, float("nan"), "1e-3", True])
def test_bad_cutoffs_are_refused(bad):
    H, S, _, _ = near_duplicate_basis()
    with pytest.raises(ElectronicError, match="overlap_cutoff"):
        solve_dense(H, S, overlap_cutoff=bad)


def test_keeping_no_direction_is_refused():
    H, S, _, _ = near_duplicate_basis()
    with pytest.raises(ElectronicError, match="leaves 0"):
        solve_dense(H, S, n_keep=0)


def test_gpaw_eigenvalues_at_every_k_with_and_without_removed_directions(chain_dataset):
    """On GPAW's H(k) and S(k) of the k-sampled chain: a cut-off below S's smallest
    eigenvalue reproduces GPAW's eigenvalues; a cut-off that removes S's two smallest
    directions solves H in a subspace of the basis, so every level can only rise
    (min-max), and the highest occupied one moves by little."""
    s = Dataset(chain_dataset)[0]
    a = s.arrays
    occ = int(round(s.n_electrons / 2))
    for kpt, ref in zip(a["kpts"], a["eigenvalues"][0]):
        H, S = s.hamiltonian(kpt), s.overlap(kpt)
        lam = la.eigvalsh(S)
        e, _ = solve_dense(H, S, overlap_cutoff=0.5 * lam[0])
        np.testing.assert_allclose(e[: len(ref)], ref, atol=1e-6)
        e2, _ = solve_dense(H, S, overlap_cutoff=1.01 * lam[1])  # two directions out
        assert len(e2) == len(lam) - 2
        n = min(len(e2), len(ref))
        assert (e2[:n] >= ref[:n] - 1e-8).all()
        assert e2[occ - 1] - ref[occ - 1] < 0.02


def test_dense_spectrum_keeps_equal_band_counts(chain_dataset):
    s = Dataset(chain_dataset)[0]
    kpts = s.arrays["kpts"]
    S_all = [la.eigvalsh(s.overlap(k)) for k in kpts]
    cut = float(np.median([x[2] for x in S_all]))  # removes 2 or 3 directions per k
    labels = OrbitalLabels.from_counts(s.orbital_counts, s.atoms.get_chemical_symbols())
    sp = DenseSpectrum(
        s.hamiltonian,
        s.overlap,
        kpts,
        np.full(len(kpts), 1.0 / len(kpts)),
        labels,
        overlap_cutoff=cut,
    )
    eps = sp.eigenvalues()
    kept = [int((x >= cut).sum()) for x in S_all]
    assert eps.shape == (len(kpts), min(kept))
    e, w = sp.mulliken()
    assert w.shape[-1] == eps.shape[1]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-8)
