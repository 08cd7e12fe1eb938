"""Exact states near an energy (shift-invert, inertia counts) against dense eigh and GPAW."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la
import scipy.sparse as sp

from ase_gearsh.electronic.dense import fermi_level
from ase_gearsh.electronic.window import (
    IndefiniteFactor,
    WindowError,
    count_below,
    edge_shift,
    fermi_states,
    initial_guess,
    local_guess,
    states_near,
    window_states,
)

pytest.importorskip("pypardiso")

# residual tolerance (eV) of the tests that compare eigenvalues with dense ones to
# 1e-9 eV; the default (1e-4 eV) is tested on its own below
STRICT = 1e-6


def random_pair(n=1200, seed=0):
    """Sparse symmetric H (eV) with a dense spectrum and S = I + small sparse part."""
    rng = np.random.default_rng(seed)
    A = sp.random(n, n, density=4.0 / n, random_state=seed)
    H = (A + A.T + sp.diags(rng.normal(scale=2.0, size=n))).tocsr()
    B = sp.random(n, n, density=2.0 / n, random_state=seed + 1) * 0.1
    S = (sp.eye(n) + 0.5 * (B + B.T)).tocsr()
    E = la.eigh(H.toarray(), S.toarray(), eigvals_only=True)
    return H, S, E


@pytest.fixture(scope="module")
def pair():
    return random_pair()


@pytest.mark.parametrize("sigma", [-3.0, 0.0123, 2.5])
def test_count_below_is_exact(pair, sigma):
    H, S, E = pair
    assert count_below(H, S, sigma) == int((E < sigma).sum())


def test_factor_solves_and_reports_inertia(pair):
    H, S, E = pair
    K = (H - 0.3 * S).tocsr()
    f = IndefiniteFactor(K)
    assert f.n_negative + f.n_positive == H.shape[0]
    assert f.n_negative == int((la.eigvalsh(K.toarray()) < 0).sum())
    B = np.random.default_rng(1).normal(size=(H.shape[0], 5))
    assert np.abs(K @ f.solve(B) - B).max() < 1e-9


@pytest.mark.parametrize("block", [4, 16])
def test_states_near_match_dense(pair, block):
    H, S, E = pair
    sigma, k = 0.37, 24
    st = states_near(H, S, sigma, k, block=block, tol=STRICT)
    ref = np.sort(E[np.argsort(np.abs(E - sigma))[:k]])
    assert np.abs(st.eigenvalues - ref).max() < 1e-9
    assert st.residuals.max() <= 1e-6
    C = st.vectors
    assert np.abs(C.T @ (S @ C) - np.eye(k)).max() < 1e-8  # S-orthonormal
    assert np.abs(H @ C - (S @ C) * st.eigenvalues).max() < 1e-5
    assert st.n_below == int((E < sigma).sum())
    # global indices: the computed states are consecutive in the spectrum
    i0 = st.n_below_set
    np.testing.assert_allclose(st.eigenvalues, E[i0 : i0 + k], atol=1e-9)
    assert st.radius == pytest.approx(np.abs(ref - sigma).max())
    # restarts happened with the small block (the basis is capped)
    assert st.solves > 0


def test_window_states_are_all_states_in_window(pair):
    H, S, E = pair
    emin, emax = -0.4, 0.25
    # k grows until the window is covered
    w = window_states(H, S, emin, emax, k=8, block=8, tol=STRICT)
    ref = E[(E >= emin) & (E <= emax)]
    assert len(ref) > 8
    assert len(w.eigenvalues) == len(ref)
    np.testing.assert_allclose(w.eigenvalues, ref, atol=1e-9)
    groups = {"a": np.arange(0, 600), "b": np.arange(600, 1200)}
    wt = w.weights(S, groups)
    np.testing.assert_allclose(wt["a"] + wt["b"], 1.0, atol=1e-10)
    # Mulliken weights of dense eigenvectors
    Ed, Cd = la.eigh(H.toarray(), S.toarray())
    sel = (Ed >= emin) & (Ed <= emax)
    wd = (Cd[:, sel] * (S.toarray() @ Cd[:, sel]))[:600].sum(axis=0)
    np.testing.assert_allclose(wt["a"], wd, atol=1e-7)


@pytest.mark.parametrize("width", [0.0, 0.002, 0.02])
def test_fermi_states_match_dense(pair, width):
    H, S, E = pair
    n_el = 2.0 * 517  # even: a definite HOMO
    fs = fermi_states(H, S, n_el, width=width, guess=1.5, k=16, block=8, tol=STRICT)
    assert fs.homo == pytest.approx(E[516], abs=1e-9)
    assert fs.lumo == pytest.approx(E[517], abs=1e-9)
    assert len(fs.factorisations) >= 2  # the guess was off: sigma moved
    if width == 0:  # no smearing: mid-gap
        assert fs.fermi_level == pytest.approx(0.5 * (E[516] + E[517]), abs=1e-9)
    else:  # Fermi-Dirac smearing, as for the dense spectrum
        ref = fermi_level(E[None, :], np.ones(1), n_el, width)
        assert fs.fermi_level == pytest.approx(ref, abs=1e-7)


def test_window_from_the_fermi_factorisation(pair):
    """A window off the factor's shift (the hole window above E_F) reuses it."""
    H, S, E = pair
    fs = fermi_states(H, S, 2.0 * 517, k=16, block=8)
    w = window_states(H, S, fs.fermi_level, fs.fermi_level + 0.2, factor=fs.factor, block=8)
    assert "factorisation" not in w.seconds  # no new factorisation
    ref = E[(E >= fs.fermi_level) & (E <= fs.fermi_level + 0.2)]
    assert len(ref) > 5
    np.testing.assert_allclose(w.eigenvalues, ref, atol=1e-9)
    with pytest.raises(WindowError, match="factor must be the IndefiniteFactor"):
        window_states(H, S, 0.0, 0.1, factor=IndefiniteFactor(H))
    fs.factor.free()


def test_window_far_from_the_factor_gets_its_own_factorisation(pair):
    """A given factor serves windows within REUSE_REACH (1 eV) of its shift; a window
    farther away is factorised at its centre; the states are the same either way."""
    H, S, E = pair
    emin, emax = -1.05, -0.95
    ref = E[(E >= emin) & (E <= emax)]
    assert len(ref) >= 3
    far = IndefiniteFactor((H - 0.2 * S).tocsr())
    far.sigma = 0.2  # 1.25 eV from the lower edge
    auto = window_states(H, S, emin, emax, factor=far, k=8, block=8)
    assert "factorisation" in auto.seconds and auto.sigma == pytest.approx(-1.0)
    np.testing.assert_allclose(auto.eigenvalues, ref, atol=1e-9)
    assert auto.n_below == int((E < -1.0).sum())
    near = IndefiniteFactor((H + 0.5 * S).tocsr())
    near.sigma = -0.5  # 0.55 eV from the lower edge
    reused = window_states(H, S, emin, emax, factor=near, k=8, block=8)
    assert "factorisation" not in reused.seconds and reused.sigma == -0.5
    np.testing.assert_allclose(reused.eigenvalues, ref, atol=1e-9)
    again = window_states(H, S, emin, emax, factor=near, refactor=True)
    assert "factorisation" in again.seconds
    np.testing.assert_allclose(again.eigenvalues, ref, atol=1e-9)
    with pytest.raises(WindowError, match="refactor must be None, True or False, got 'yes'"):
        window_states(H, S, emin, emax, factor=near, refactor="yes")
    near.free()
    near.free()  # twice is harmless
    with pytest.raises(WindowError, match="was freed"):
        near.solve(np.ones(H.shape[0]))


def test_states_near_stops_when_the_converged_states_reach_far_enough(pair):
    """With enough=(d, 0) the iteration stops once the states converged below sigma reach
    d: fewer states than asked for, every one converged, none left out."""
    H, S, E = pair
    sigma, d = 0.37, 0.3
    st = states_near(H, S, sigma, 0, below=64, above=0, enough=(d, 0.0), block=8, tol=STRICT)
    n_in = int(((E < sigma) & (E >= sigma - d)).sum())
    assert n_in < len(st.eigenvalues) < 64  # stopped early, just past the reach
    assert st.residuals.max() <= 1e-6
    assert st.reach_below >= d
    lo = E[(E < sigma) & (E >= sigma - st.reach_below)]
    np.testing.assert_allclose(st.eigenvalues, lo, atol=1e-9)
    full = states_near(H, S, sigma, 0, below=64, above=0, block=8, tol=STRICT)
    assert len(full.eigenvalues) == 64 and st.solves < full.solves


def test_initial_guess_avoids_diagonal_values():
    H = sp.diags([-2.0, -2.0, -1.0, 0.5]).tocsr()
    S = sp.eye(4).tocsr()
    g = initial_guess(H, S, 4.0)  # two states filled: between -2 and -1
    assert -2.0 < g < -1.0


def test_gpaw_water_states(h2o_gpw):
    """Window states of GPAW's own H and S rebuild GPAW's eigenvalues, count and gap."""
    from ase_gearsh.core.blocks import assemble
    from gpaw_tools.extract import extract

    arrays, meta = extract(h2o_gpw)
    blocks = [arrays[k] for k in ("orbital_counts",)]
    H = assemble(
        blocks[0],
        arrays["onsite_H"][0],
        arrays["pair_ij"],
        arrays["pair_shift"],
        arrays["pair_H"][0],
        sparse=True,
    )
    S = assemble(
        blocks[0],
        arrays["onsite_S"],
        arrays["pair_ij"],
        arrays["pair_shift"],
        arrays["pair_S"],
        sparse=True,
    )
    eps = arrays["eigenvalues"][0, 0]
    n_el = meta["n_electrons"]
    nocc = int(round(n_el / 2))
    fs = fermi_states(H, S, n_el, k=4, block=4)  # 23 orbitals: the dense path inside
    # the local-cluster guess: here a cluster is the whole molecule (exact DOS), so the
    # broadened level lies in the gap; from it the first shift finds the level
    atom_of = np.repeat(np.arange(len(blocks[0])), blocks[0])
    g = local_guess(H, S, n_el, atom_of)
    assert eps[nocc - 1] < g < eps[nocc]
    fs2 = fermi_states(H, S, n_el, k=4, block=4, atom_of=atom_of)
    assert len(fs2.factorisations) == 1 and fs2.homo == pytest.approx(fs.homo, abs=1e-9)
    assert fs.homo == pytest.approx(eps[nocc - 1], abs=1e-5)
    assert fs.lumo == pytest.approx(eps[nocc], abs=1e-5)
    assert count_below(H, S, 0.5 * (fs.homo + fs.lumo)) == nocc
    w = window_states(H, S, eps[nocc - 1] - 3.0, eps[nocc] + 0.01, k=2, block=4)
    ref = eps[(eps >= eps[nocc - 1] - 3.0) & (eps <= eps[nocc] + 0.01)]
    np.testing.assert_allclose(w.eigenvalues, ref, atol=1e-5)


def test_edge_shift_rule():
    """A window ending in the gap gets a shift just beyond its band edge, in the gap."""
    # valence-band window: homo + a quarter of the width, at most half the gap
    assert edge_shift(-5.2, -5.0, -5.0, -4.2) == pytest.approx(-4.95)
    assert edge_shift(-5.2, -5.0, -5.0, -4.96) == pytest.approx(-4.98)  # half the gap
    # conduction-band window, mirrored
    assert edge_shift(-4.3, -4.0, -5.0, -4.2) == pytest.approx(-4.2 - 0.075)
    # no edge: inside a band, inside the gap, across the gap, or a metal's spacing
    assert edge_shift(-6.0, -5.5, -5.0, -4.2) is None
    assert edge_shift(-4.8, -4.6, -5.0, -4.2) is None
    assert edge_shift(-5.5, -4.0, -5.0, -4.2) is None
    assert edge_shift(-5.2, -5.0, -5.0, -4.995) is None
    with pytest.raises(WindowError, match="homo must be a finite number"):
        edge_shift(-5.2, -5.0, float("nan"), -4.2)


def test_window_at_a_band_edge_factorised_in_the_gap(pair):
    """With the gap known, a window that ends in it is factorised just beyond the edge
    (not at the far factor's shift nor at its centre); the states are all of the
    window's, as with an explicit ``sigma``; ``sigma`` with ``refactor=False`` is an
    error."""
    H, S, E = pair
    gaps = np.where(np.abs(E[:-1]) < 3.0, np.diff(E), 0.0)
    i = int(np.argmax(gaps))  # the widest spacing: a "gap" of 0.02 eV
    homo, lumo = E[i], E[i + 1]
    assert lumo - homo > 0.015
    emin, emax = homo - 0.3, homo + 1e-6
    ref = E[(E >= emin) & (E <= emax)]
    assert len(ref) >= 5
    far = IndefiniteFactor((H - (homo + 3.0) * S).tocsr())
    far.sigma = homo + 3.0
    w = window_states(H, S, emin, emax, factor=far, k=8, block=8, gap=(homo, lumo))
    sigma = edge_shift(emin, emax, homo, lumo)
    assert homo < sigma < lumo
    assert "factorisation" in w.seconds and w.sigma == pytest.approx(sigma)
    assert w.n_below == i + 1  # every state up to the homo lies below the edge shift
    np.testing.assert_allclose(w.eigenvalues, ref, atol=1e-9)
    mine = window_states(H, S, emin, emax, k=8, block=8, sigma=homo + 0.01)
    assert mine.sigma == pytest.approx(homo + 0.01)
    np.testing.assert_allclose(mine.eigenvalues, ref, atol=1e-9)
    with pytest.raises(WindowError, match="sigma is the shift of a new factorisation"):
        window_states(H, S, emin, emax, factor=far, refactor=False, sigma=homo)
    # release: the given factor is freed before a new factorisation, not when reused
    near = IndefiniteFactor((H - (homo + 0.01) * S).tocsr())
    near.sigma = homo + 0.01
    kept = window_states(H, S, emin, emax, factor=near, refactor=False, release=True)
    assert not near.freed and "factorisation" not in kept.seconds
    again = window_states(H, S, emin, emax, factor=far, gap=(homo, lumo), release=True)
    assert far.freed and "factorisation" in again.seconds
    np.testing.assert_allclose(again.eigenvalues, ref, atol=1e-9)
    after = window_states(H, S, emin, emax, factor=far, k=8, block=8)  # freed: a new one
    assert "factorisation" in after.seconds
    np.testing.assert_allclose(after.eigenvalues, ref, atol=1e-9)
    with pytest.raises(WindowError, match="the given factor was freed"):
        window_states(H, S, emin, emax, factor=far, refactor=False)
    near.free()


def test_window_continues_when_a_request_runs_out_of_solves(pair):
    """Each request gets few solves (max_solves); what converged is kept and the next,
    larger request continues the same space, until the window is covered."""
    H, S, E = pair
    emin, emax = -0.4, 0.25
    ref = E[(E >= emin) & (E <= emax)]
    w = window_states(H, S, emin, emax, k=8, block=4, max_solves=32, tol=STRICT)
    np.testing.assert_allclose(w.eigenvalues, ref, atol=1e-9)
    assert w.solves > 32  # more than one request's budget: it went on
    st = states_near(
        H, S, 0.0, 0, below=40, above=40, block=4, max_solves=64, partial=True, tol=STRICT
    )
    assert 0 < len(st.eigenvalues) < 80  # the converged part, nearest sigma outwards
    assert st.residuals.max() <= 1e-6
    inside = (E >= -st.reach_below - 1e-9) & (E <= st.reach_above + 1e-9)
    np.testing.assert_allclose(st.eigenvalues, E[inside], atol=1e-9)


def test_errors(pair):
    H, S, _ = pair
    with pytest.raises(WindowError, match="same shape"):
        count_below(H, S[:10, :10], 0.0)
    with pytest.raises(WindowError, match="sigma must be a finite number"):
        count_below(H, S, float("nan"))
    with pytest.raises(WindowError, match="must be symmetric"):
        count_below(sp.csr_matrix(np.triu(H.toarray())), S, 0.0)
    with pytest.raises(WindowError, match="complex"):
        count_below(H * (1 + 1j), S, 0.0)
    with pytest.raises(WindowError, match="k must be an integer"):
        states_near(H, S, 0.0, 0)
    with pytest.raises(WindowError, match="emax > emin"):
        window_states(H, S, 1.0, 0.0)
    with pytest.raises(WindowError, match="n_electrons must lie between"):
        fermi_states(H, S, 5000.0)
    with pytest.raises(WindowError, match="did not converge"):
        states_near(H, S, 0.0, 40, block=4, max_solves=8)


def test_parallel_sparse_product_equals_scipy():
    from ase_gearsh.electronic import sparse_products

    A = sp.random(3000, 2000, density=0.02, random_state=4, format="csr")
    X = np.random.default_rng(5).normal(size=(2000, 40))
    assert A.nnz * X.shape[1] >= sparse_products.MIN_WORK  # the threaded path
    np.testing.assert_allclose(sparse_products.csr_times_block(A, X), A @ X, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        sparse_products.csr_times_block(A, np.asfortranarray(X[:, :3])), A @ X[:, :3], atol=1e-12
    )


def test_block_product_of_atom_rows_equals_the_row_by_row_product():
    """Rows in runs with the same columns (atom-pair blocks of 1-13 orbitals): the run
    kernel gives the row-by-row kernel's numbers exactly; rows one by one, complex and
    small blocks fall back."""
    from ase_gearsh.electronic import sparse_products

    rng = np.random.default_rng(6)
    sizes = rng.integers(1, 14, size=300)  # orbitals per atom
    mask = rng.random((300, 300)) < 0.08
    mask |= mask.T | np.eye(300, dtype=bool)
    blocks = [
        [rng.normal(size=(a, b)) if mask[i, j] else None for j, b in enumerate(sizes)]
        for i, a in enumerate(sizes)
    ]
    A = sp.csr_matrix(sp.bmat(blocks))
    A.sort_indices()
    bp = sparse_products.BlockProduct(A)
    assert bp.runs is not None and len(bp.runs) - 1 <= 300 * 2  # runs of rows, not rows
    assert np.diff(bp.runs).max() <= bp.MAX_RUN
    X = rng.normal(size=(A.shape[1], 32))
    assert A.nnz * 32 >= sparse_products.MIN_WORK
    np.testing.assert_array_equal(bp @ X, sparse_products.csr_times_block(A, X))
    np.testing.assert_allclose(bp @ X, A @ X, rtol=0, atol=1e-11)
    np.testing.assert_allclose(bp @ X[:, :2], A @ X[:, :2], atol=1e-11)  # small: scipy
    Z = X + 1j * rng.normal(size=X.shape)
    np.testing.assert_allclose(bp @ Z, A @ Z, atol=1e-11)  # complex block
    R = sp.random(3000, 2000, density=0.02, random_state=4, format="csr")  # rows differ
    assert sparse_products.BlockProduct(R).runs is None
    Y = rng.normal(size=(2000, 40))
    np.testing.assert_allclose(sparse_products.BlockProduct(R) @ Y, R @ Y, atol=1e-12)


def test_one_sided_requests_match_dense(pair):
    """The nearest states below and above sigma (extremes of the shift-invert operator)."""
    H, S, E = pair
    sigma = 0.21
    nb = int((E < sigma).sum())
    st = states_near(H, S, sigma, 0, below=3, above=20, block=8)
    np.testing.assert_allclose(st.eigenvalues, E[nb - 3 : nb + 20], atol=1e-9)
    assert st.reach_below == pytest.approx(sigma - E[nb - 3])
    assert st.reach_above == pytest.approx(E[nb + 19] - sigma)
    # continuing the same Krylov space for more states
    more = states_near(H, S, sigma, 0, below=3, above=40, block=8, space=st.space)
    np.testing.assert_allclose(more.eigenvalues, E[nb - 3 : nb + 40], atol=1e-9)


def test_fermi_level_across_a_gap():
    """An insulator whose first shift lies in the valence band: the states across the
    gap converge slowly from there, so the next shift goes to the gap's middle."""
    H0, S, E0 = random_pair(n=800, seed=3)
    Sd = S.toarray()
    E, C = la.eigh(H0.toarray(), Sd)
    n_occ = 400
    Eg = np.where(np.arange(len(E)) < n_occ, E - 2.0, E + 2.0)  # a gap of 4 eV or more
    SC = Sd @ C
    H = sp.csr_matrix((SC * Eg) @ SC.T)  # eigenpairs (Eg, C) with the same S
    H = 0.5 * (H + H.T)
    guess = Eg[n_occ - 30] + 1e-3  # 29 states below the HOMO lie above the guess
    fs = fermi_states(H, S, 2.0 * n_occ, guess=guess, k=48, block=8, tol=STRICT)
    assert fs.homo == pytest.approx(Eg[n_occ - 1], abs=1e-8)
    assert fs.lumo == pytest.approx(Eg[n_occ], abs=1e-8)
    assert fs.fermi_level == pytest.approx(0.5 * (Eg[n_occ - 1] + Eg[n_occ]), abs=1e-8)
    # the second shift lies in the gap: exactly the occupied states below it
    assert len(fs.factorisations) == 2 and fs.factorisations[1][1] == n_occ
    fs.factor.free()


def test_default_tolerance_keeps_every_state_and_eigenvalues_to_1e_6(pair):
    """The default residual tolerance (1e-4 eV) converges fewer vectors but finds the
    same states: Ritz values are accurate to about ||r||^2 / (level spacing)."""
    H, S, E = pair
    sigma, k = 0.37, 24
    strict = states_near(H, S, sigma, k, block=16, tol=STRICT)
    st = states_near(H, S, sigma, k, block=16)
    ref = np.sort(E[np.argsort(np.abs(E - sigma))[:k]])
    assert len(st.eigenvalues) == k
    assert np.abs(st.eigenvalues - ref).max() < 1e-6
    C = st.vectors
    true_res = np.linalg.norm(H @ C - (S @ C) * st.eigenvalues, axis=0)
    assert true_res.max() <= 1e-4
    assert st.solves <= strict.solves
    fs = fermi_states(H, S, 2.0 * 517, k=16, block=8)
    assert fs.homo == pytest.approx(E[516], abs=1e-6)
    assert fs.lumo == pytest.approx(E[517], abs=1e-6)


class _NoisyFactor:
    """A factorisation whose solves are off by a relative ``eps`` (as an inexact solver's
    would be): the identity H K^-1 B = B + sigma S K^-1 B no longer holds to rounding."""

    def __init__(self, factor, eps):
        self.f, self.eps = factor, eps
        self.sigma, self.shape, self.n_negative = factor.sigma, factor.shape, factor.n_negative
        self.rng = np.random.default_rng(3)

    def solve(self, B):
        X = self.f.solve(B)
        return X + self.eps * np.abs(X).max() * self.rng.standard_normal(X.shape)


def test_implicit_h_products_match_explicit_ones_and_fall_back_when_solves_are_inexact(pair):
    """The Krylov space gets H X from H K^-1 B = B + sigma S K^-1 B instead of a sparse
    product; its stored H Q equals H @ Q, and when inexact solves break the identity the
    returned states are still exact (checked with H applied anew, then explicit)."""
    H, S, E = pair
    sigma, k = 0.37, 12
    ref = np.sort(E[np.argsort(np.abs(E - sigma))[:k]])
    st = states_near(H, S, sigma, k, block=8, tol=STRICT)
    space = st.space
    assert space.implicit
    HQ = H @ space.Q
    assert np.abs(space.HQ - HQ).max() < 1e-9 * np.abs(HQ).max()
    noisy = _NoisyFactor(IndefiniteFactor((H - sigma * S).tocsr()), 1e-10)
    noisy.f.sigma = noisy.sigma = sigma
    st = states_near(H, S, sigma, k, block=8, factor=noisy, tol=STRICT)
    assert not st.space.implicit  # the check found the stored H Q off and recomputed it
    np.testing.assert_allclose(st.eigenvalues, ref, atol=1e-9)
    C = st.vectors
    assert np.linalg.norm(H @ C - (S @ C) * st.eigenvalues, axis=0).max() <= STRICT
