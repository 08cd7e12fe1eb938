"""Single-precision supernodal triangular solves, and KPM with them, against double
precision and dense eigenvalues."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la
import scipy.sparse as sp
from sksparse import cholmod

from ase_gearsh.electronic import supernodal
from ase_gearsh.electronic.kpm import (
    SINGLE_MIN,
    CholeskyFactor,
    KPMError,
    chebyshev_moments,
    moments_from_eigen,
    spectral_bounds,
)
from ase_gearsh.electronic.supernodal import SupernodalError, SupernodalFactor

pytestmark = pytest.mark.skipif(not supernodal.available(), reason="needs numba")


def overlap_like(n_atoms=60, norb=4, seed=0):
    """A sparse SPD matrix of atoms in a box, orbitals of neighbours coupled (a 3D
    pattern: the Cholesky factor fills in and has wide supernodes)."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 8.0, size=(n_atoms, 3))
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    n = n_atoms * norb
    S = np.zeros((n, n))
    for i, j in zip(*np.nonzero(d < 3.5)):
        if i < j:
            blk = rng.normal(scale=0.12 * np.exp(-d[i, j]), size=(norb, norb))
            S[i * norb : (i + 1) * norb, j * norb : (j + 1) * norb] = blk
    S = S + S.T + np.eye(n)
    assert la.eigvalsh(S).min() > 0.2
    return sp.csc_matrix(S)


def system(n_atoms=60, seed=0, complex_s=False):
    """H (levels -6, -1, 2, 5 eV per atom plus couplings on S's pattern) and S."""
    S = sp.csr_array(overlap_like(n_atoms, seed=seed))
    rng = np.random.default_rng(seed + 100)
    A = sp.csr_array((rng.normal(size=S.nnz), S.indices, S.indptr), shape=S.shape)
    H = 0.5 * (A + A.T) + sp.diags_array(np.tile([-6.0, -1.0, 2.0, 5.0], n_atoms))
    if complex_s:
        S = S + 1e-2j * sp.csr_array(sp.triu(S, 1) - sp.tril(S, -1))
    return sp.csr_array(H), S


def factor_of(S):
    f = cholmod.cholesky(sp.csc_matrix(S), mode="supernodal")
    return f.L(), f.P()


@pytest.mark.parametrize("width", [1, 3, 1024])
def test_double_panels_solve_like_scipy(width):
    S = overlap_like()
    L, _ = factor_of(S)
    n = L.shape[0]
    F = SupernodalFactor(L, np.float64, width=width)
    assert F.n_supernodes < n or width == 1
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((n, 5))
    Ld = L.toarray()
    assert np.allclose(F.forward(Y), la.solve_triangular(Ld, Y, lower=True), rtol=0, atol=1e-11)
    assert np.allclose(F.backward(Y), la.solve_triangular(Ld.T, Y, lower=False), atol=1e-11)
    y = Y[:, 0] + 1j * Y[:, 1]  # 1D and complex vectors
    x = F.forward(y)
    assert x.shape == (n,) and x.dtype == np.complex128
    assert np.allclose(x, la.solve_triangular(Ld, y, lower=True), atol=1e-11)


def test_single_panels_are_accurate_to_single_round_off():
    S = overlap_like(seed=2)
    L, _ = factor_of(S)
    F64, F32 = SupernodalFactor(L, np.float64), SupernodalFactor(L)
    assert F32.panels.dtype == np.float32 and F32.nbytes < F64.nbytes
    Y = np.random.default_rng(3).standard_normal((L.shape[0], 8))
    for a, b in ((F32.forward(Y), F64.forward(Y)), (F32.backward(Y), F64.backward(Y))):
        assert a.dtype == np.float64
        err = np.abs(a - b).max() / np.abs(b).max()
        assert 1e-9 < err < 1e-5  # single precision, not double, and not worse


def test_bad_factors_are_refused():
    L, _ = factor_of(overlap_like(n_atoms=10))
    with pytest.raises(SupernodalError, match="lower triangular"):
        SupernodalFactor(L.T)
    no_diag = sp.csc_matrix(L.toarray() - np.diag(L.diagonal()))
    with pytest.raises(SupernodalError, match="lower triangular"):
        SupernodalFactor(no_diag)
    with pytest.raises(SupernodalError, match="real"):
        SupernodalFactor(L.astype(complex))
    with pytest.raises(SupernodalError, match="dtype must be float32 or float64"):
        SupernodalFactor(L, np.float16)
    with pytest.raises(SupernodalError, match="width must be an integer >= 1"):
        SupernodalFactor(L, width=0)
    with pytest.raises(SupernodalError, match="non-empty square"):
        SupernodalFactor(L[:, :5])
    with pytest.raises(SupernodalError, match=r"shape \(40,\) or \(40, k\); got \(39, 2\)"):
        SupernodalFactor(L).forward(np.ones((39, 2)))


def test_single_precision_factor_solves_like_cholmod():
    S = overlap_like(seed=4)
    double, single = CholeskyFactor(S), CholeskyFactor(S, precision="single")
    assert single.precision == "single" and single.factor is None  # CHOLMOD's copy released
    Y = np.random.default_rng(5).standard_normal((S.shape[0], 4))
    for solve in ("lt_solve", "l_solve"):
        a, b = getattr(single, solve)(Y), getattr(double, solve)(Y)
        assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()
    # L_f L_f^T = S: the two solves invert S
    x = single.lt_solve(single.l_solve(Y))
    assert np.abs(S @ x - Y).max() < 1e-5 * np.abs(Y).max()


def test_kpm_in_single_precision_matches_dense_and_double():
    """Exact-trace moments (every unit vector) with single-precision solves against the
    moments of the dense eigenvalues, and the stochastic ones against double precision
    with the same random vectors (at 256 moments the difference is round-off, far below
    the stochastic error)."""
    H, S = system(80, seed=3)
    E = la.eigh(H.toarray(), S.toarray(), eigvals_only=True)
    bounds = spectral_bounds(H, S)
    single = CholeskyFactor(S, precision="single")
    got = chebyshev_moments(H, S, 256, exact=True, bounds=bounds, factor=single, block=H.shape[0])
    want = moments_from_eigen(E, np.ones((1, len(E))), got.center, got.half_width, 256)
    assert np.abs(got.moments[0] - want[0]).max() < 1e-6 * len(E)
    groups = {"s": np.arange(0, H.shape[0], 4)}
    a = chebyshev_moments(H, S, 256, 8, groups, bounds=bounds, factor=single)
    b = chebyshev_moments(H, S, 256, 8, groups, bounds=bounds, factor=CholeskyFactor(S))
    diff = np.abs(a.moments - b.moments).max()
    spread = a.per_vector.std(axis=1).mean() / np.sqrt(8)
    assert diff < 1e-5 * len(E) and diff < 1e-3 * spread


def test_precision_choices():
    H, S = system(10)
    assert CholeskyFactor(S).precision == "double"
    assert CholeskyFactor(S, precision="auto").precision == "double"  # below SINGLE_MIN
    assert S.shape[0] < SINGLE_MIN
    with pytest.raises(KPMError, match=r"precision must be one of \('double', 'single', 'auto'\)"):
        CholeskyFactor(S, precision="half")
    _, Sc = system(10, complex_s=True)
    with pytest.raises(KPMError, match="needs a real S"):
        CholeskyFactor(Sc, precision="single")
    assert CholeskyFactor(Sc, precision="auto").precision == "double"
