"""KPM DOS / projected DOS of H c = E S c checked against dense scipy.linalg.eigh."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import scipy.linalg as la
import scipy.sparse as sp
from scipy.integrate import cumulative_trapezoid, trapezoid

import ase_gearsh.electronic.kpm as kpm_module
from ase_gearsh.electronic.kpm import (
    BOUNDS_RTOL,
    CholeskyFactor,
    KPMError,
    chebyshev_moments,
    jackson_kernel,
    kpm_density,
    kpm_dos,
    kpm_fermi_level,
    kpm_fermi_window_count,
    kpm_n_moments,
    kpm_window_count,
    moments_from_eigen,
    spectral_bounds,
)

NORB = 3
M_EXACT = 256
R_STOCH = 64


def chain(n_atoms=150, seed=1, complex_h=False, complex_s=False):
    """Tight-binding chain, 3 orbitals per atom: H couples atoms up to 2 apart,
    S = I + a small nearest-neighbour symmetric/Hermitian perturbation."""
    rng = np.random.default_rng(seed)
    n = n_atoms * NORB

    def banded(reach, scale, diag, cplx):
        M = np.zeros((n, n), dtype=complex if cplx else float)
        for i in range(n_atoms):
            for j in range(i, min(n_atoms, i + reach + 1)):
                blk = rng.normal(scale=scale / (1 + j - i), size=(NORB, NORB))
                if cplx:  # adds an i * antisymmetric part to the Hermitian matrix
                    blk = blk + 1j * rng.normal(scale=0.3 * scale / (1 + j - i), size=(NORB, NORB))
                M[i * NORB : (i + 1) * NORB, j * NORB : (j + 1) * NORB] = blk
        M = 0.5 * (M + M.conj().T)
        M[np.diag_indices(n)] += diag
        return M

    H = banded(2, 1.5, np.tile([-6.0, -1.0, 2.0], n_atoms), complex_h)
    S = banded(1, 0.08, 1.0, complex_s)
    assert la.eigvalsh(S).min() > 0.3
    return sp.csr_array(H), sp.csr_array(S)


def atom_groups(n_atoms):
    """even/odd atoms partition all orbitals; 's' (first orbital of each atom) overlaps both."""
    idx = np.arange(n_atoms * NORB).reshape(n_atoms, NORB)
    return {"even": idx[0::2].ravel(), "odd": idx[1::2].ravel(), "s": idx[:, 0].copy()}


def dense_reference(H, S, groups):
    """Eigenvalues and Mulliken weights per group, row 0 all ones."""
    Sd = S.toarray()
    E, C = la.eigh(H.toarray(), Sd)
    w = (np.conj(C) * (Sd @ C)).real  # w[mu, k] = Re(conj(c_mu,k) (S c)_mu,k)
    assert np.allclose(w.sum(0), 1.0)
    return E, np.vstack([np.ones(len(E))] + [w[g].sum(0) for g in groups.values()])


@lru_cache
def reference(n_atoms=150, seed=1, complex_h=False, complex_s=False):
    """(H, S, groups, eigenvalues, Mulliken weights); dense eigh only once per system."""
    H, S = chain(n_atoms, seed, complex_h, complex_s)
    groups = atom_groups(n_atoms)
    return (H, S, groups, *dense_reference(H, S, groups))


@pytest.fixture(scope="module")
def real_system():
    H, S, groups, E, W = reference()
    bounds = spectral_bounds(H, S)
    exact = chebyshev_moments(H, S, M_EXACT, groups=groups, bounds=bounds, exact=True, block=64)
    stoch = chebyshev_moments(H, S, M_EXACT, n_random=R_STOCH, groups=groups, bounds=bounds, seed=3)
    return dict(H=H, S=S, groups=groups, E=E, W=W, bounds=bounds, exact=exact, stoch=stoch)


def energy_grid(mom, pad=1.0, npts=4001):
    lo, hi = mom.center - mom.half_width, mom.center + mom.half_width
    return np.linspace(lo - pad, hi + pad, npts)


def test_exact_moments_match_dense(real_system):
    mom = real_system["exact"]
    n = real_system["H"].shape[0]
    assert mom.names == ["total", "even", "odd", "s"] and mom.n_random == 0 and mom.n_orbitals == n
    ref = moments_from_eigen(
        real_system["E"], real_system["W"], mom.center, mom.half_width, M_EXACT
    )
    assert ref.shape == mom.moments.shape
    assert np.abs(mom.moments - ref).max() < 1e-8 * n
    assert mom.moments[0, 0] == pytest.approx(n, abs=1e-10)


def test_exact_moments_do_not_depend_on_block():
    H, S = chain(n_atoms=20)
    a = chebyshev_moments(H, S, 32, exact=True, block=7).moments
    b = chebyshev_moments(H, S, 32, exact=True, block=60).moments
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-11)


def test_stochastic_moments(real_system):
    st, ex, groups = real_system["stoch"], real_system["exact"], real_system["groups"]
    n = real_system["H"].shape[0]
    sizes = [n] + [len(g) for g in groups.values()]
    # Rademacher: sum_mu r_mu^2 = |group| for every vector, so mu_0 is exact
    np.testing.assert_allclose(st.moments[:, 0], sizes, rtol=0, atol=1e-10)
    assert st.n_random == R_STOCH
    grid = energy_grid(ex)
    de, ds = kpm_density(ex, grid), kpm_density(st, grid)
    for name, size in zip(st.names, sizes):
        err = np.abs(cumulative_trapezoid(ds[name] - de[name], grid)).max() / size
        # a trace estimate of a (bounded) matrix X with R Rademacher vectors has a relative
        # standard deviation ~ sqrt(2 / (size R)); allow 3 sigma (2.5 % of n for the total)
        assert 1e-6 < err < 3 * np.sqrt(2 / (size * R_STOCH)), name
    H, S, bounds = real_system["H"], real_system["S"], real_system["bounds"]
    run = [
        chebyshev_moments(H, S, 16, n_random=4, bounds=bounds, seed=s).moments for s in (5, 5, 6)
    ]
    np.testing.assert_array_equal(run[0], run[1])  # seeded
    assert np.abs(run[0] - run[2]).max() > 1e-3


def test_density_integrates_to_counts(real_system):
    n = real_system["H"].shape[0]
    for mom in (real_system["exact"], real_system["stoch"]):
        grid = energy_grid(mom)
        dos = kpm_density(mom, grid)
        sizes = [n] + [len(g) for g in real_system["groups"].values()]
        for name, size in zip(mom.names, sizes):
            # mu_0 is exact; the grid quadrature of the m >= 1 terms leaves ~1e-6
            assert trapezoid(dos[name], grid) == pytest.approx(size, rel=1e-5), name
        assert np.abs(dos["even"] + dos["odd"] - dos["total"]).max() < 1e-10
        outside = np.abs(grid - mom.center) >= mom.half_width
        assert np.all(dos["total"][outside] == 0.0)
    # the Jackson kernel is positive: exact moments give a non-negative total DOS
    dos = kpm_density(real_system["exact"], energy_grid(real_system["exact"]))["total"]
    assert dos.min() > -1e-9 * dos.max()


def test_window_count_and_its_standard_error(real_system, monkeypatch):
    """kpm_window_count integrates the KPM density exactly (against the grid), and its
    standard error from the vectors' own estimates covers the stochastic error: the
    exact moments' count lies within 4 errors for windows of every group, and the error
    shrinks like 1 / sqrt(vectors)."""
    ex, st = real_system["exact"], real_system["stoch"]
    assert ex.per_vector is None and st.per_vector.shape == (4, R_STOCH, M_EXACT)
    np.testing.assert_allclose(st.per_vector.mean(axis=1), st.moments, atol=1e-12)
    lo, hi = ex.center - ex.half_width, ex.center + ex.half_width
    E = real_system["E"]
    covered = 0
    for e0, e1 in ((lo, hi), (E[20] - 0.3, E[60] + 0.1), (E[100], E[140])):
        for name in st.names:
            exact, none = kpm_window_count(ex, e0, e1, name)
            assert none is None
            count, err = kpm_window_count(st, e0, e1, name)
            grid = np.linspace(max(e0, lo), min(e1, hi), 20001)
            by_grid = trapezoid(kpm_density(st, grid)[name], grid)
            assert count == pytest.approx(by_grid, abs=1e-4 * max(1.0, by_grid))
            assert 0 < err and abs(count - exact) < 4 * err, (name, e0, e1, count, exact, err)
            covered += abs(count - exact) < err
    assert covered >= 4  # about 68 % of the 12 estimates lie within one error (measured: 9)
    # the whole spectrum: mu_0 alone, exact for every vector (Rademacher): no error
    assert kpm_window_count(st, lo - 1, hi + 1)[1] == pytest.approx(0.0, abs=1e-9)
    H, S, bounds = real_system["H"], real_system["S"], real_system["bounds"]
    e0, e1 = E[20] - 0.3, E[60] + 0.1
    errs = [
        kpm_window_count(chebyshev_moments(H, S, 64, r, bounds=bounds, seed=2), e0, e1)[1]
        for r in (8, 128)
    ]
    assert 2.0 < errs[0] / errs[1] < 8.0  # sqrt(16) = 4
    # too many per-vector numbers to keep (e.g. per atom at device scale): the same
    # moments, summed as they come, and no error bar
    kept = chebyshev_moments(H, S, 64, 8, groups=real_system["groups"], bounds=bounds, seed=2)
    monkeypatch.setattr(kpm_module, "PER_VECTOR_MAX", 0)
    summed = chebyshev_moments(H, S, 64, 8, groups=real_system["groups"], bounds=bounds, seed=2)
    assert summed.per_vector is None and kpm_window_count(summed, e0, e1)[1] is None
    np.testing.assert_allclose(summed.moments, kept.moments, rtol=0, atol=1e-10)
    with pytest.raises(KPMError, match=r"no row\(s\) 'W' in these moments"):
        kpm_window_count(st, e0, e1, "W")
    with pytest.raises(KPMError, match="need emin < emax"):
        kpm_window_count(st, e1, e0)
    with pytest.raises(KPMError, match="non-empty list of rows"):
        kpm_window_count(st, e0, e1, [])


def test_fermi_window_count_jackknife(real_system):
    """The count above the KPM Fermi level with a jackknife error that recomputes E_F
    without each vector: the exact moments' count lies within 4 errors; a separate
    total-alone run on the same vectors gives the same E_F, count and error."""
    ex, st = real_system["exact"], real_system["stoch"]
    H, S, bounds = real_system["H"], real_system["S"], real_system["bounds"]
    n_el = float(H.shape[0])  # half of the orbitals occupied: E_F inside the bands
    count, err, ef = kpm_fermi_window_count(st, n_el, 0.5, ["even"])
    assert ef == pytest.approx(kpm_fermi_level(st, n_el), abs=1e-9)
    assert count == pytest.approx(kpm_window_count(st, ef, ef + 0.5, "even")[0], abs=1e-12)
    exact_count, none, ef_exact = kpm_fermi_window_count(ex, n_el, 0.5, ["even"])
    assert none is None and abs(ef - ef_exact) < 0.5
    assert 0 < err and abs(count - exact_count) < 4 * err, (count, exact_count, err)
    total = chebyshev_moments(H, S, M_EXACT, R_STOCH, bounds=bounds, seed=3)  # doubled
    again = kpm_fermi_window_count(st, n_el, 0.5, ["even"], fermi_moments=total)
    np.testing.assert_allclose(again, (count, err, ef), rtol=1e-6)
    fewer = chebyshev_moments(H, S, M_EXACT, 4, bounds=bounds, seed=3)
    with pytest.raises(KPMError, match="same random vectors"):
        kpm_fermi_window_count(st, n_el, 0.5, "even", fermi_moments=fewer)
    with pytest.raises(KPMError, match="window must be a number of eV > 0"):
        kpm_fermi_window_count(st, n_el, 0.0, "even")


def test_kpm_dos_matches_broadened_dense(real_system):
    mom, E = real_system["exact"], real_system["E"]
    n, a, b = len(E), mom.half_width, mom.center
    grid = energy_grid(mom, pad=0.0)
    kpm = kpm_density(mom, grid)["total"]

    def gaussians(sigma):
        z = (grid[:, None] - E[None, :]) / sigma
        return (np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))).sum(1)

    # Jackson resolution pi a / M: integrated DOS agrees to 0.1 % of n (measured)
    dense = gaussians(np.pi * a / M_EXACT)
    assert np.abs(cumulative_trapezoid(kpm - dense, grid)).max() < 5e-3 * n
    # the Jackson kernel's exact width (Weisse et al. 2006, eq. 73) narrows towards |x| -> 1;
    # with it the DOS itself agrees (measured: L1 0.8 % of n, max 1.4 % of the peak)
    x = (E - b) / a
    var = (
        (M_EXACT - x**2 * (M_EXACT - 1))
        / (2 * (M_EXACT + 1))
        * (1 - np.cos(2 * np.pi / (M_EXACT + 1)))
    )
    dense = gaussians(a * np.sqrt(var))
    assert trapezoid(np.abs(kpm - dense), grid) < 2e-2 * n
    assert np.abs(kpm - dense).max() < 4e-2 * dense.max()


class CountingFactor(CholeskyFactor):
    """The Cholesky factor of S that counts the Chebyshev steps (L^-1 solves)."""

    steps = 0

    def l_solve(self, y):
        self.steps += 1
        return super().l_solve(y)


def doubled_and_plain(H, S, n_moments, bounds, groups=None, seed=0):
    """Moments and step counts (L^-1 solves) for doubling on/off and exact/stochastic
    (8 vectors), in blocks of 7 (several blocks, the last one short)."""
    runs, steps = {}, {}
    for doubling in (True, False):
        for exact in (True, False):
            f = CountingFactor(S)
            runs[doubling, exact] = chebyshev_moments(
                H,
                S,
                n_moments,
                8,
                groups=groups,
                bounds=bounds,
                exact=exact,
                block=7,
                factor=f,
                doubling=doubling,
                seed=seed,
            ).moments
            steps[doubling, exact] = f.steps
    return runs, steps


@pytest.mark.parametrize(
    "n_moments, complex_h", [(64, False), (33, False), (48, True), (2, False), (3, True)]
)
def test_total_moments_two_per_step(n_moments, complex_h):
    """Without groups the total moments take half the steps (doubling identities) and
    are the same numbers as one moment per step: exact against dense eigenvalues,
    stochastic equal to rounding."""
    H, S, _, E, _ = reference(80, seed=2, complex_h=complex_h)
    bounds = spectral_bounds(H, S)
    runs, steps = doubled_and_plain(H, S, n_moments, bounds)
    for (doubling, exact), n_steps in steps.items():
        per_block = n_moments // 2 if doubling else n_moments - 1
        assert n_steps == -(-(240 if exact else 8) // 7) * per_block, (doubling, exact)
    a = 0.5 * (bounds[1] - bounds[0]) / 0.99
    ref = moments_from_eigen(E, np.ones_like(E), 0.5 * sum(bounds), a, n_moments)
    assert np.abs(runs[True, True] - ref).max() < 1e-9 * len(E)
    assert np.abs(runs[True, False] - runs[False, False]).max() < 1e-9 * len(E)
    assert np.abs(runs[True, False] - ref).max() > 1e-3  # stochastic, not exact
    # several groups: one moment per step by default (more vectors than steps saved)
    f = CountingFactor(S)
    chebyshev_moments(H, S, n_moments, 8, groups=atom_groups(80), bounds=bounds, factor=f)
    assert f.steps == n_moments


@pytest.mark.parametrize(
    "n_moments, complex_h, complex_s", [(64, False, False), (33, True, False), (40, True, True)]
)
def test_group_moments_two_per_step(n_moments, complex_h, complex_s):
    """With extra start vectors w_g = L^-1 P_g L r the group moments also come two per
    step, the same numbers as one per step: exact against dense Mulliken weights
    (overlapping groups included), stochastic equal to rounding; one group does it by
    default (the hole count's W+Se), several only when asked."""
    H, S, groups, E, W = reference(80, seed=2, complex_h=complex_h, complex_s=complex_s)
    bounds = spectral_bounds(H, S)
    a, b = 0.5 * (bounds[1] - bounds[0]) / 0.99, 0.5 * sum(bounds)
    ref = moments_from_eigen(E, W, b, a, n_moments)
    runs, steps = doubled_and_plain(H, S, n_moments, bounds, groups, seed=5)
    for (doubling, exact), n_steps in steps.items():
        blocks = -(-(240 if exact else 8) // 7)
        solves = blocks * (n_moments // 2 + 1) if doubling else blocks * n_moments
        assert n_steps == solves, (doubling, exact)  # + one L^-1 per block for w_g
    n = len(E)
    assert np.abs(runs[True, True] - ref).max() < 1e-9 * n
    assert np.abs(runs[True, False] - runs[False, False]).max() < 1e-9 * n
    assert np.abs(runs[True, False][1:] - ref[1:]).max() > 1e-3  # stochastic, not exact
    # one group: two per step by default, the same numbers as that group's row above
    f = CountingFactor(S)
    one = chebyshev_moments(
        H,
        S,
        n_moments,
        8,
        groups={"odd": groups["odd"]},
        bounds=bounds,
        block=7,
        factor=f,
        seed=5,
    )
    assert f.steps == 2 * (n_moments // 2 + 1) and one.names == ["total", "odd"]
    assert np.abs(one.moments - runs[False, False][[0, 2]]).max() < 1e-9 * n
    with pytest.raises(KPMError, match="doubling must be True, False or None"):
        chebyshev_moments(H, S, 8, 2, groups=groups, bounds=bounds, doubling="yes")
    with pytest.raises(KPMError, match="doubling with 3 groups propagates 4 x 8 vectors"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kpm_module, "DOUBLING_MAX", 4 * 8 * 240 - 1)
            chebyshev_moments(H, S, 8, 8, groups=groups, bounds=bounds, doubling=True)


@pytest.mark.parametrize("complex_s", [False, True])
def test_complex_hermitian_matches_dense(complex_s):
    H, S, groups, E, W = reference(80, seed=2, complex_h=True, complex_s=complex_s)
    assert np.abs(H.toarray().imag).max() > 0.1 and (S.dtype.kind == "c") == complex_s
    mom = chebyshev_moments(H, S, 128, groups=groups, exact=True, block=80)
    ref = moments_from_eigen(E, W, mom.center, mom.half_width, 128)
    assert np.abs(mom.moments - ref).max() < 1e-8 * len(E)
    energies, dos = kpm_dos(H, S, n_moments=128, n_random=32, groups=groups, npts=501)
    assert energies.shape == (501,) and set(dos) == {"total", "even", "odd", "s"}
    assert trapezoid(dos["total"], energies) == pytest.approx(len(E), rel=1e-4)


def test_nearly_dependent_basis_matches_dense():
    """A basis with nearly equal functions (S's condition number ~1e6, as with diffuse
    orbitals at device scale, where conjugate gradients need ~1000 iterations): the
    change of basis keeps the eigenvalues, and the Cholesky path still gives the
    exact moments and the bounds of dense diagonalisation."""
    n_atoms = 80  # 240 orbitals: bounds by Lanczos
    H, S = chain(n_atoms, seed=4)
    T = np.eye(3 * n_atoms)
    T[1::3, 2::3] = np.eye(n_atoms)  # orbital 3i+2 -> phi_(3i+1) + 0.003 phi_(3i+2)
    T[2::3, 2::3] = 0.003 * np.eye(n_atoms)
    Hd, Sd = T.T @ H.toarray() @ T, T.T @ S.toarray() @ T
    assert np.linalg.cond(Sd) > 1e5
    Hb, Sb = sp.csr_array(Hd), sp.csr_array(Sd)
    groups = atom_groups(n_atoms)
    E, W = dense_reference(Hb, Sb, groups)
    np.testing.assert_allclose(E, la.eigh(H.toarray(), S.toarray(), eigvals_only=True), atol=1e-8)
    tol = BOUNDS_RTOL * np.abs(E).max()  # Lanczos's relative tolerance
    assert spectral_bounds(Hb, Sb, margin=0.0) == pytest.approx((E[0], E[-1]), abs=tol)
    mom = chebyshev_moments(Hb, Sb, 96, groups=groups, exact=True, block=240)
    ref = moments_from_eigen(E, W, mom.center, mom.half_width, 96)
    assert np.abs(mom.moments - ref).max() < 1e-7 * len(E)


@pytest.mark.parametrize(
    "n_atoms, seed, complex_h", [(150, 1, False), (50, 1, False), (80, 2, True)]
)
def test_spectral_bounds(n_atoms, seed, complex_h):  # ARPACK (n > 200) and dense (n <= 200) paths
    H, S, _, E, _ = reference(n_atoms, seed, complex_h)
    width = E[-1] - E[0]
    # Lanczos (n > 200) to a relative tolerance of BOUNDS_RTOL; dense to rounding
    tol = (BOUNDS_RTOL if len(E) > 200 else 1e-12) * np.abs(E).max()
    lo, hi = spectral_bounds(H, S, margin=0.05)
    assert lo < E[0] - 0.04 * width and hi > E[-1] + 0.04 * width
    assert lo == pytest.approx(E[0] - 0.05 * width, abs=2 * tol)
    assert hi == pytest.approx(E[-1] + 0.05 * width, abs=2 * tol)
    assert spectral_bounds(H, S, margin=0.0) == pytest.approx((E[0], E[-1]), abs=tol)


def test_default_bounds_enclose_the_spectrum_far_from_zero():
    """The default 1 % margins, and at least twice Lanczos's error bound (2 BOUNDS_RTOL max |E|)
    when the spectrum lies far from 0 eV: moments on the default bounds stay exact."""
    from ase_gearsh.electronic.kpm import BOUNDS_MARGIN

    H, S, _, E, _ = reference(150, 1, False)  # 450 orbitals: Lanczos
    width = E[-1] - E[0]
    lo, hi = spectral_bounds(H, S)
    assert BOUNDS_MARGIN == 0.01
    assert lo < E[0] - 0.009 * width and hi > E[-1] + 0.009 * width
    assert hi - lo < 1.03 * width  # 1 % each side (plus Lanczos's tolerance), not 5 %
    shift = 40.0 * width  # the same levels 40 widths above 0 eV: E + shift, H + shift S
    Hs = sp.csr_array(H + shift * S)
    lo, hi = spectral_bounds(Hs, S)
    pad = 2.0 * BOUNDS_RTOL * (E[-1] + shift)
    assert pad > 0.01 * width  # the error bound, not the margin, sets the widening here
    # the Ritz values lie within the residual bound BOUNDS_RTOL max |E| = pad / 2 of the
    # ends, so the bounds reach at least pad / 2 beyond them, and at most pad
    assert lo <= E[0] + shift - 0.49 * pad and hi >= E[-1] + shift + 0.49 * pad
    assert hi - lo <= width + 2.0 * pad + 1e-9
    mom = chebyshev_moments(Hs, S, 64, exact=True, block=450)  # default bounds
    ref = moments_from_eigen(E + shift, np.ones_like(E), mom.center, mom.half_width, 64)
    assert np.abs(mom.moments[0] - ref[0]).max() < 1e-7 * len(E)


def test_lanczos_ends_converge_to_the_extreme_eigenvalues():
    """The bounds' Lanczos: both extreme Ritz values within the residual tolerance of the
    exact ends of a dense spectrum (inside it), in far fewer products than the size; a
    limit on the steps that is too small raises."""
    rng = np.random.default_rng(3)
    n = 2000
    E = np.sort(np.concatenate([rng.uniform(-20.0, 5.0, n - 2), [-21.0, 40.0]]))
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * E) @ Q.T
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    lo, hi = kpm_module._lanczos_ends(matvec, rng.standard_normal(n), 3e-3)
    tol = 3e-3 * 40.0
    eps = 1e-9  # rounding: Ritz values lie inside the spectrum
    assert E[0] - eps <= lo <= E[0] + tol and E[-1] - tol <= hi <= E[-1] + eps
    assert len(calls) < 100
    with pytest.raises(KPMError, match="did not converge in 5 steps"):
        kpm_module._lanczos_ends(A.__matmul__, rng.standard_normal(n), 1e-12, max_steps=5)


def test_fermi_level_from_moments(real_system):
    E, n = real_system["E"], len(real_system["E"])
    mom = real_system["exact"]
    resolution = np.pi * mom.half_width / M_EXACT
    for n_occ in (n // 3, n // 2, 2 * n // 3):
        ef = kpm_fermi_level(mom, 2.0 * n_occ)  # spin-paired: two electrons per state
        assert E[n_occ - 1] - 2 * resolution <= ef <= E[n_occ] + 2 * resolution, n_occ
        assert kpm_fermi_level(mom, 2.0 * n_occ) == ef  # a pure function of the moments
    assert kpm_fermi_level(mom, n, nspins=2) == kpm_fermi_level(mom, 2 * n)
    # no electrons: the lower spectral bound (x = -(1 - EDGE)), where the integration starts
    lower = mom.center - mom.half_width * (1.0 - kpm_module.EDGE)
    assert kpm_fermi_level(mom, 0.0) == pytest.approx(lower)
    with pytest.raises(KPMError, match=f"{2 * n + 2} electrons do not fit into {n} orbitals"):
        kpm_fermi_level(mom, 2 * n + 2)
    assert kpm_n_moments((-10.0, 10.0), 0.1) == int(np.ceil(np.pi * 10 / 0.1))
    assert kpm_n_moments((-1.0, 1.0), 1.0) == 64 and kpm_n_moments((-1e4, 1e4), 0.01) == 8192
    with pytest.raises(KPMError, match="resolution must be > 0 eV; got 0"):
        kpm_n_moments((-1.0, 1.0), 0)


def test_jackson_kernel():
    g = jackson_kernel(100)
    assert g.shape == (100,) and g[0] == pytest.approx(1.0, abs=1e-14)
    assert np.all(np.diff(g) < 0) and g[-1] > 0


def test_errors():
    H, S = chain(n_atoms=10)
    n = H.shape[0]
    with pytest.raises(KPMError, match=r"same shape; got H \(30, 30\) and S \(27, 27\)"):
        chebyshev_moments(H, S[:27, :27])
    with pytest.raises(KPMError, match="square"):
        spectral_bounds(H[:, :29], S)
    with pytest.raises(KPMError, match="n_moments must be an integer >= 2; got 1"):
        chebyshev_moments(H, S, n_moments=1)
    with pytest.raises(KPMError, match="n_random must be an integer >= 1; got 0"):
        chebyshev_moments(H, S, n_random=0)
    with pytest.raises(KPMError, match="S must be positive definite"):
        chebyshev_moments(H, S - 2.0 * sp.eye_array(n))  # indefinite
    with pytest.raises(KPMError, match="S must be positive definite"):
        spectral_bounds(H, sp.diags_array(np.r_[np.ones(n - 1), 0.0]))  # singular
    with pytest.raises(KPMError, match=r"factor must be the CholeskyFactor of this S \(30, 30\)"):
        chebyshev_moments(H, S, factor=CholeskyFactor(S[:27, :27]))
    with pytest.raises(KPMError, match=r"S must be a non-empty square 2D matrix; got \(30, 29\)"):
        CholeskyFactor(S[:, :29])
    with pytest.raises(KPMError, match="H must be symmetric/Hermitian"):
        spectral_bounds(H + sp.csr_array(([0.5], ([0], [1])), shape=(n, n)), S)
    with pytest.raises(KPMError, match="group 'x' must be a non-empty"):
        chebyshev_moments(H, S, groups={"x": np.array([], dtype=int)})
    with pytest.raises(KPMError, match=r"must lie in \[0, 30\); got range \[0, 30\]"):
        chebyshev_moments(H, S, groups={"x": np.array([0, 30])})
    with pytest.raises(KPMError, match="must lie in"):
        chebyshev_moments(H, S, groups={"x": np.array([-1, 3])})
    with pytest.raises(KPMError, match="emin < emax"):
        chebyshev_moments(H, S, bounds=(1.0, -1.0))
    E = la.eigh(H.toarray(), S.toarray(), eigvals_only=True)
    with pytest.raises(KPMError, match="do not enclose the spectrum"):
        chebyshev_moments(H, S, bounds=(E[0] + 1.0, E[-1]), n_moments=256)


def test_resolution_coarser_than_width_is_stated(real_system, capsys):
    """A width finer than the capped moment count can resolve gives a warning that
    states the resolution reached; the progress bar counts Chebyshev steps."""
    import warnings

    from ase_gearsh.electronic.kpm import KPMResolutionWarning, kpm_resolution
    from ase_gearsh.electronic.spectrum import KPMSpectrum, OrbitalLabels

    H, S = real_system["H"], real_system["S"]
    n = H.shape[0]
    labels = OrbitalLabels.from_counts([1] * n, ["H"] * n)
    spec = KPMSpectrum(H, S, labels, {"n_moments": 64, "n_random": 2}, progress=True)
    a = 0.5 * (spec.bounds[1] - spec.bounds[0])
    assert kpm_resolution(spec.bounds, 64) == pytest.approx(np.pi * a / 0.99 / 64)
    with pytest.warns(KPMResolutionWarning, match=r"resolution is [0-9.]+ eV with 64 moments"):
        spec.dos(width=0.001, npts=11)
    assert f"KPM ({n} orbitals, 2 vectors, 64 moments)" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error", KPMResolutionWarning)
        spec.dos(width=2 * kpm_resolution(spec.bounds, 64), npts=11)  # resolved: no warning
