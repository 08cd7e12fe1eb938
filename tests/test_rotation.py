"""H'_ij = D_i^T H_ij D_j between a molecule and its rotated copy (two GPAW runs).

D is built from GPAW's own real spherical harmonics: Y(Q x) = Y(x) @ D(Q).
The real-space grid breaks rotation symmetry slightly (egg-box effect), so the
comparison has a tolerance; measured at h = 0.2 A on rattled methanol (this
seed): largest block deviation 4.9e-3 eV, eigenvalues 4.6e-3 eV, S 2e-15.
"""

import numpy as np
import pytest
from scipy.linalg import block_diag
from scipy.spatial.transform import Rotation

from gpaw_tools.extract import extract

H_TOL = 2e-2  # eV, block elements
S_TOL = 1e-6  # overlap: two-centre integrals, no grid
EPS_TOL = 2e-2  # eV, eigenvalues


def wigner_real(l, Q, rng):
    from gpaw.sphere.spherical_harmonics import Y

    x = rng.normal(size=(64, 3))
    x /= np.linalg.norm(x, axis=1)[:, None]
    Qx = x @ Q.T
    A = np.array([[Y(l * l + m, *v) for m in range(2 * l + 1)] for v in x])
    B = np.array([[Y(l * l + m, *v) for m in range(2 * l + 1)] for v in Qx])
    D, *_ = np.linalg.lstsq(A, B, rcond=None)
    assert np.abs(A @ D - B).max() < 1e-10
    return D


@pytest.fixture(scope="module")
def rotated_pair(gpw_dir, gpaw_run, make_atoms):
    rng = np.random.default_rng(7)
    Q = Rotation.random(random_state=11).as_matrix()
    a = make_atoms.low_symmetry_molecule()
    b = a.copy()
    c = a.get_center_of_mass()
    b.positions = c + (a.positions - c) @ Q.T
    pa = gpaw_run(a, gpw_dir / "meoh.gpw")
    pb = gpaw_run(b, gpw_dir / "meoh_rot.gpw")
    return extract(pa), extract(pb), Q, rng


def test_blocks_rotate_as_DT_H_D(rotated_pair):
    (A, ma), (B, mb), Q, rng = rotated_pair
    Dl = {l: wigner_real(l, Q, rng) for l in range(3)}
    D = {sym: block_diag(*[Dl[l] for l in b["l"]]) for sym, b in ma["basis"].items()}
    from ase import Atoms

    syms = Atoms(numbers=A["numbers"]).get_chemical_symbols()
    n = A["orbital_counts"]
    off2 = np.concatenate([[0], np.cumsum(n * n)])
    errH = errS = 0.0
    for a in range(len(n)):
        sl = slice(off2[a], off2[a + 1])
        Ha = A["onsite_H"][0, sl].reshape(n[a], n[a])
        Hb = B["onsite_H"][0, sl].reshape(n[a], n[a])
        Da = D[syms[a]]
        errH = max(errH, np.abs(Da.T @ Ha @ Da - Hb).max())
    assert A["pair_ij"].tolist() == B["pair_ij"].tolist()
    for p, (i, j) in enumerate(A["pair_ij"]):
        sl = slice(A["pair_offsets"][p], A["pair_offsets"][p + 1])
        Hij = A["pair_H"][0, sl].reshape(n[i], n[j])
        Sij = A["pair_S"][sl].reshape(n[i], n[j])
        Di, Dj = D[syms[i]], D[syms[j]]
        errH = max(errH, np.abs(Di.T @ Hij @ Dj - B["pair_H"][0, sl].reshape(n[i], n[j])).max())
        errS = max(errS, np.abs(Di.T @ Sij @ Dj - B["pair_S"][sl].reshape(n[i], n[j])).max())
    print(f"rotation: max |D^T H D - H'| = {errH:.2e} eV, S: {errS:.2e}")
    assert errH < H_TOL
    assert errS < S_TOL
    # a wrong rule (no rotation) is far off: the test can fail
    wrong = np.abs(A["pair_H"][0] - B["pair_H"][0]).max()
    assert wrong > 10 * H_TOL


def test_eigenvalues_invariant(rotated_pair):
    (A, _), (B, _), _, _ = rotated_pair
    diff = np.abs(A["eigenvalues"] - B["eigenvalues"]).max()
    print(f"rotation: max eigenvalue change {diff:.2e} eV")
    assert diff < EPS_TOL
