"""Deep (semicore) states taken out of the KPM interval, checked against dense eigh."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la
import scipy.sparse as sp

from ase_gearsh.electronic.deflation import DeflationError, auto_threshold, deep_states
from ase_gearsh.electronic.kpm import (
    KPMError,
    chebyshev_moments,
    kpm_density,
    kpm_fermi_level,
    kpm_n_moments,
    kpm_window_count,
    moments_from_eigen,
    spectral_bounds,
)
from ase_gearsh.electronic.spectrum import KPMSpectrum, OrbitalLabels

NO = 4  # orbitals per atom: one deep (-60 eV), three valence
BELOW = -30.0


def solid(n_atoms=40, seed=0, coupling=1.0, complex_h=False):
    """Atoms in a box, each with a deep level near -60 eV and three valence levels,
    hopping and overlap decaying with distance; the deep orbital couples to the others
    with strength ``coupling`` (0: exactly decoupled, an exact invariant subspace)."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 3.0 * n_atoms ** (1 / 3), (n_atoms, 3))
    n = n_atoms * NO
    H = np.zeros((n, n), complex if complex_h else float)
    S = np.zeros((n, n))
    for a in range(n_atoms):
        i = slice(a * NO, (a + 1) * NO)
        h = np.diag([-60.0, -8.0, -4.0, 1.0] + rng.normal(0, 0.3, NO))
        h[1:, 1:] += rng.normal(0, 0.3, (3, 3))
        h[0, 1:] = coupling * rng.normal(0, 0.5, 3)
        s = np.eye(NO)
        s[0, 1:] = 0.05 * coupling
        H[i, i], S[i, i] = 0.5 * (h + h.T), 0.5 * (s + s.T)
        for b in range(a):
            d = np.linalg.norm(pos[a] - pos[b])
            if d < 4.0:
                f = np.exp(-d)
                j = slice(b * NO, (b + 1) * NO)
                hb = -3.0 * f * rng.uniform(0.5, 1.0, (NO, NO))
                sb = 0.3 * f * rng.uniform(0.5, 1.0, (NO, NO))
                hb[0, 1:] *= 0.3 * coupling
                hb[1:, 0] *= 0.3 * coupling
                sb[0, 1:] *= 0.2 * coupling
                sb[1:, 0] *= 0.2 * coupling
                hb[0, 0] *= 0.1
                sb[0, 0] *= 0.1
                if complex_h:
                    hb = hb * np.exp(1j * rng.uniform(0, 0.3, (NO, NO)))
                H[i, j], H[j, i] = hb, hb.conj().T
                S[i, j], S[j, i] = sb, sb.T
    return sp.csr_array(H), sp.csr_array(S), np.repeat(np.arange(n_atoms), NO)


def dense(H, S):
    E, C = la.eigh(H.toarray(), S.toarray())
    return E, (np.conj(C) * (S @ C)).real  # Mulliken weights per orbital and state


def test_exact_invariant_subspace_gives_the_moments_of_the_other_states():
    """Deep orbitals that couple to nothing but each other: span(Q) is exactly invariant,
    so the deflated moments are exactly those of the remaining states."""
    H, S, atom_of = solid(coupling=0.0)
    E, w = dense(H, S)
    deep = deep_states(H, S, atom_of, BELOW, tol=np.inf)
    m = deep.count
    assert m == 40 and np.sum(E < BELOW) == m
    np.testing.assert_allclose(deep.energies, E[:m], atol=1e-9)
    assert deep.residual < 1e-9
    bounds = spectral_bounds(H, S, deep=deep)
    assert E[m] > bounds[0] > E[m] - 1.0 and E[-1] < bounds[1] < E[-1] + 1.0
    groups = {"deep orbitals": np.arange(0, H.shape[0], NO), "rest": np.flatnonzero(atom_of % 2)}
    mom = chebyshev_moments(H, S, 64, exact=True, groups=groups, bounds=bounds, deep=deep)
    W = np.stack([np.ones(E.size), w[::NO].sum(0), w[np.flatnonzero(atom_of % 2)].sum(0)])
    ref = moments_from_eigen(E[m:], W[:, m:], mom.center, mom.half_width, 64)
    np.testing.assert_allclose(mom.moments, ref, atol=1e-8 * H.shape[0])
    np.testing.assert_allclose(mom.deep_energies, E[:m], atol=1e-9)
    np.testing.assert_allclose(mom.deep_weights, W[:, :m], atol=1e-9)


@pytest.mark.parametrize("complex_h", [False, True])
def test_clusters_bring_the_remaining_levels_to_the_dense_ones(complex_h):
    """Coupled deep orbitals: the levels of H' (deep states parked 1 eV below the rest)
    approach the exact ones as the clusters grow (tol: the coupling an atom needs to
    join); the error is second order in the subspace's error."""
    H, S, atom_of = solid(complex_h=complex_h)
    E, _ = dense(H, S)
    errors, residuals = [], []
    for tol in (np.inf, 0.3, 0.0):
        deep = deep_states(H, S, atom_of, BELOW, tol=tol, max_atoms=100)
        m = deep.count
        np.testing.assert_allclose(deep.energies, E[:m], atol=0.05)
        Z, X = deep.parked(E[m] - 1.0)
        Zd = Z.toarray()
        Ep = la.eigh(H.toarray() + Zd @ X @ Zd.conj().T, S.toarray(), eigvals_only=True)
        rest = np.sort(Ep)[m:]  # the parked states are the m lowest
        assert np.ptp(np.sort(Ep)[:m]) < 1.0
        errors.append(np.abs(rest - E[m:]).max())
        residuals.append(deep.residual)
    assert errors[0] > 0.05  # the atomic levels alone: a visible error
    assert errors[1] < 0.3 * errors[0] and errors[2] < 0.02 * errors[0]
    assert residuals[2] < 0.1 * residuals[0]


def test_deflated_kpm_counts_match_dense_with_fewer_moments():
    H, S, atom_of = solid()
    E, w = dense(H, S)
    deep = deep_states(H, S, atom_of, BELOW, tol=0.0)
    full, cut = spectral_bounds(H, S), spectral_bounds(H, S, deep=deep)
    assert (cut[1] - cut[0]) < 0.35 * (full[1] - full[0])
    M_full, M_cut = kpm_n_moments(full, 0.2), kpm_n_moments(cut, 0.2)
    assert M_cut < 0.35 * M_full
    groups = {"deep orbitals": np.arange(0, H.shape[0], NO)}
    a = chebyshev_moments(H, S, M_full, exact=True, groups=groups, bounds=full)
    b = chebyshev_moments(H, S, M_cut, exact=True, groups=groups, bounds=cut, deep=deep)
    r = chebyshev_moments(H, S, M_cut, n_random=16, groups=groups, bounds=cut, deep=deep)
    for lo, hi in ((-70.0, -50.0), (-12.0, -6.0), (-6.0, -3.0), (-3.0, 3.0)):
        exact = np.sum((E >= lo) & (E <= hi))
        exact_g = w[::NO][:, (E >= lo) & (E <= hi)].sum()
        for mom in (a, b):  # same kernel resolution: the same broadening error
            assert abs(kpm_window_count(mom, lo, hi)[0] - exact) < 0.04 * exact + 1.0
            assert abs(kpm_window_count(mom, lo, hi, "deep orbitals")[0] - exact_g) < 0.1
        count, err = kpm_window_count(r, lo, hi)
        assert abs(count - kpm_window_count(b, lo, hi)[0]) < 5 * err + 0.5
    # deep states counted exactly: no stochastic error in their window
    assert kpm_window_count(r, -70.0, -50.0)[1] < 1e-9
    # the density integrates to all states, the deep ones included
    e = np.linspace(-75.0, cut[1] + 1.0, 40001)
    rho = kpm_density(b, e)
    assert abs(np.trapezoid(rho["total"], e) - H.shape[0]) < 0.05
    assert abs(np.trapezoid(rho["deep orbitals"], e) - w[::NO].sum()) < 0.05
    # the Fermi level of a half-filled valence: the same with and without deflation
    n_el = 2 * (deep.count + 50)
    assert abs(kpm_fermi_level(a, n_el) - kpm_fermi_level(b, n_el)) < 0.1


def test_bad_input():
    H, S, atom_of = solid(n_atoms=10)
    with pytest.raises(DeflationError, match="not separated"):
        deep_states(H, S, atom_of, -8.0)  # the threshold cuts a valence level
    with pytest.raises(DeflationError, match="atom_of"):
        deep_states(H, S, atom_of[:-1], BELOW)
    with pytest.raises(DeflationError, match="contiguous"):
        deep_states(H, S, atom_of[::-1].copy(), BELOW)
    with pytest.raises(DeflationError, match="tol"):
        deep_states(H, S, atom_of, BELOW, tol=-1.0)
    with pytest.raises(DeflationError, match="max_atoms"):
        deep_states(H, S, atom_of, BELOW, max_atoms=0)
    with pytest.raises(DeflationError, match="threads must be None or an integer >= 0"):
        deep_states(H, S, atom_of, BELOW, threads=-1)
    assert deep_states(H, S, atom_of, -100.0) is None  # nothing that deep
    other = deep_states(*solid(n_atoms=12)[:2], np.repeat(np.arange(12), NO), BELOW)
    with pytest.raises(KPMError, match="DeepStates of these matrices"):
        chebyshev_moments(H, S, 16, n_random=2, deep=other)


@pytest.mark.parametrize("threads", [1, 3])
def test_clusters_in_threads_give_the_sequential_result(threads):
    """The clusters' eigenproblems side by side in threads (one BLAS thread each) give
    the deep states of one after another; a cluster that cuts a band still raises."""
    H, S, atom_of = solid(coupling=1.0)
    ref = deep_states(H, S, atom_of, BELOW, threads=0)
    got = deep_states(H, S, atom_of, BELOW, threads=threads)
    np.testing.assert_allclose(got.energies, ref.energies, rtol=0, atol=1e-10)
    assert abs(got.basis - ref.basis).max() < 1e-12
    with pytest.raises(DeflationError, match="not separated"):
        deep_states(H, S, atom_of, -8.0, threads=threads)


def test_auto_threshold_cuts_the_gap_under_the_valence_levels():
    # the highest gap of >= 8 eV below the median: between -60 and -9 eV
    levels = [np.array([-60.0, -8.0, -4.0, 1.0])] * 5 + [np.array([-75.0, -9.0, 2.0])]
    assert auto_threshold(levels) == pytest.approx(-34.5)
    assert auto_threshold([np.array([-9.0, -4.0, 1.0, 3.0])]) is None  # no wide gap
    H, S, atom_of = solid()
    deep = deep_states(H, S, atom_of, "auto")
    assert deep.count == 40 and deep.below == pytest.approx(
        auto_threshold(
            [
                la.eigh(
                    H.toarray()[i : i + NO, i : i + NO],
                    S.toarray()[i : i + NO, i : i + NO],
                    eigvals_only=True,
                )
                for i in range(0, H.shape[0], NO)
            ]
        )
    )
    with pytest.raises(DeflationError, match="below must be an energy in eV or 'auto'"):
        deep_states(H, S, atom_of, "deep")


def test_kpm_spectrum_takes_the_deep_states_out_by_default():
    """The calculator's KPM path: deep_below='auto' (default) needs a fifth of the moments
    of deep_below=None here, and gives the same DOS, window counts and Fermi level."""
    H, S, atom_of = solid()
    E, w = dense(H, S)
    labels = OrbitalLabels(atom_of, tuple("AB"[i % 2] for i in range(40)))
    auto = KPMSpectrum(H, S, labels, {"n_random": 32})
    off = KPMSpectrum(H, S, labels, {"n_random": 32, "deep_below": None})
    assert off.deep is None and auto.deep.count == 40
    assert auto.n_moments(0.2) < 0.35 * off.n_moments(0.2)
    e_auto, dos_auto = auto.dos(width=0.2, npts=4001)
    assert e_auto[0] < E[0] - 0.5  # the default grid reaches the deep states
    e = np.linspace(-70.0, 5.0, 3001)
    a, b = (
        auto.dos(width=0.2, emin=-70.0, emax=5.0, npts=3001)[1],
        off.dos(width=0.2, emin=-70.0, emax=5.0, npts=3001)[1],
    )
    assert abs(np.trapezoid(a, e) - np.trapezoid(b, e)) < 1.0  # 160 states in all
    n_el = 2 * (40 + 50)
    assert abs(auto.fermi_level(n_el) - off.fermi_level(n_el)) < 0.15
    pa = auto.pdos(width=0.2, emin=-70.0, emax=5.0, npts=3001)[1]
    exact_a = w[atom_of % 2 == 0].sum()
    assert abs(np.trapezoid(pa["A"], e) - exact_a) < 1.0


def test_auto_falls_back_with_a_warning(monkeypatch):
    import ase_gearsh.electronic.deflation as deflation

    H, S, atom_of = solid(n_atoms=10)
    labels = OrbitalLabels(atom_of, ("A",) * 10)
    monkeypatch.setattr(deflation, "auto_threshold", lambda levels: -8.0)  # cuts a level
    with pytest.warns(UserWarning, match="without taking deep states out"):
        assert KPMSpectrum(H, S, labels).deep is None
    with pytest.raises(DeflationError, match="not separated"):  # an explicit one raises
        _ = KPMSpectrum(H, S, labels, {"deep_below": -8.0}).deep


def test_numpy_paths_give_the_compiled_results(monkeypatch):
    """Without numba the diagonal blocks and the clusters' blocks come from scipy slicing:
    the same deep states."""
    import ase_gearsh.electronic.deflation as deflation

    H, S, atom_of = solid(n_atoms=20)
    a = deep_states(H, S, atom_of, BELOW, tol=0.0)
    monkeypatch.setattr(deflation, "compiled", lambda fn: None)
    b = deep_states(H, S, atom_of, BELOW, tol=0.0)
    assert a.count == b.count == 20
    np.testing.assert_array_equal(a.energies, b.energies)
    assert (a.basis != b.basis).nnz == 0


def test_lanczos_bounds_without_the_deep_states_enclose_the_others():
    """Above DENSE_MAX orbitals the bounds come from Lanczos (relative tolerance
    BOUNDS_RTOL) with the deep states parked inside: the default margins still enclose
    the other states, the ends are within the tolerance of them, and exact moments on
    those bounds are the other states' own."""
    from ase_gearsh.electronic.kpm import BOUNDS_MARGIN, BOUNDS_RTOL, DENSE_MAX

    H, S, atom_of = solid(n_atoms=80, seed=3, coupling=0.0)  # an exact invariant subspace
    assert H.shape[0] > DENSE_MAX
    E, w = dense(H, S)
    deep = deep_states(H, S, atom_of, BELOW, tol=np.inf)
    m = deep.count
    assert m == 80 and deep.residual < 1e-9
    lo_ex, hi_ex = E[m], E[-1]
    tol = BOUNDS_RTOL * np.abs(E[m:]).max()
    assert spectral_bounds(H, S, margin=0.0, deep=deep) == pytest.approx((lo_ex, hi_ex), abs=tol)
    lo, hi = spectral_bounds(H, S, deep=deep)
    pad = BOUNDS_MARGIN * (hi_ex - lo_ex)
    assert lo < lo_ex - 0.9 * pad and hi > hi_ex + 0.9 * pad
    mom = chebyshev_moments(H, S, 48, exact=True, bounds=(lo, hi), deep=deep, block=H.shape[0])
    ref = moments_from_eigen(E[m:], np.ones(E.size - m), mom.center, mom.half_width, 48)
    np.testing.assert_allclose(mom.moments[0], ref[0], atol=1e-8 * H.shape[0])
