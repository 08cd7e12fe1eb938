"""Sparse assembly of H(k) from blocks against an explicit dense sum."""

import numpy as np
import pytest

from ase_gearsh.core.blocks import BlockMatrices


def _dense_reference(counts, pi, pj, shift, onsite, pairs, k):
    """M(k) = sum over blocks, written out element by element."""
    off = np.concatenate([[0], np.cumsum(counts)])
    M = np.zeros((off[-1], off[-1]), complex)
    pos = 0
    for a, n in enumerate(counts):
        M[off[a] : off[a + 1], off[a] : off[a + 1]] += onsite[pos : pos + n * n].reshape(n, n)
        pos += n * n
    pos = 0
    for i, j, R in zip(pi, pj, shift):
        B = pairs[pos : pos + counts[i] * counts[j]].reshape(counts[i], counts[j])
        pos += B.size
        B = B * np.exp(2j * np.pi * np.dot(k, R))
        M[off[i] : off[i + 1], off[j] : off[j + 1]] += B
        M[off[j] : off[j + 1], off[i] : off[i + 1]] += B.conj().T
    return M


@pytest.mark.parametrize("compiled", [True, "threads", False])
@pytest.mark.parametrize("small_cell", [True, False])
def test_matrix_equals_dense_sum(small_cell, compiled, monkeypatch):
    """Images sharing an atom pair (small cell, i == j with R != 0) are summed; a
    large cell has one block per atom pair.  CSR is canonical at Gamma and at k, with
    the compiled block writer (numba; "threads": split over 3 threads, as large
    matrices are) and with the numpy one."""
    from ase_gearsh.core import blocks

    if compiled:
        pytest.importorskip("numba")
        assert blocks._fill_kernel() is not None
        if compiled == "threads":
            monkeypatch.setattr(blocks, "PARALLEL_FILL_MIN", 0)
            monkeypatch.setattr(blocks.processes, "usable_cores", lambda: 3)
            pools = []

            class Spy(blocks.ThreadPoolExecutor):
                def __init__(self, *a, **kw):
                    pools.append(a)
                    super().__init__(*a, **kw)

            monkeypatch.setattr(blocks, "ThreadPoolExecutor", Spy)
    else:
        monkeypatch.setattr(blocks, "_fill_kernel", lambda: None)
    rng = np.random.default_rng(1)
    N, P = (4, 14) if small_cell else (25, 120)
    counts = rng.integers(1, 6, N)
    if small_cell:
        pi, pj = rng.integers(0, N, P), rng.integers(0, N, P)
        shift = rng.integers(-1, 2, (P, 3))
        pi[0], pj[0], shift[0] = 2, 2, (1, 0, 0)  # an atom and its own image
    else:
        upper = np.array([(i, j) for i in range(N) for j in range(i + 1, N)])
        pi, pj = upper[rng.choice(len(upper), P, replace=False)].T
        shift = np.zeros((P, 3), int)
    onsite = np.concatenate(
        [(lambda b: (b + b.T).ravel())(rng.normal(size=(n, n))) for n in counts]
    )  # symmetric on-site blocks
    pairs = rng.normal(size=int((counts[pi] * counts[pj]).sum()))
    bm = BlockMatrices(counts, pi, pj, shift, onsite, pairs)
    for k in ([0, 0, 0], [0.1, -0.3, 0.25]):
        M = bm.matrix(k if any(k) else None)
        M.check_format(full_check=True)
        assert M.has_sorted_indices
        assert all((np.diff(c) > 0).all() for c in np.split(M.indices, M.indptr[1:-1]))
        ref = _dense_reference(counts, pi, pj, shift, onsite, pairs, np.array(k))
        assert M.dtype == (np.complex128 if any(k) else np.float64)
        np.testing.assert_allclose(M.toarray(), ref, atol=1e-13)
        assert abs(M - M.conj().T).max() < 1e-14
        assert np.count_nonzero(ref) > 0.3 * ref.size  # not trivially sparse
    if compiled == "threads":  # shared entries (small cell) stay in one thread
        assert pools == ([] if small_cell else [(3,), (3,)])


def test_supercell_gamma_holds_the_folded_kpoints(chain_dataset):
    """GPAW's k-sampled chain: H and S of the 1x1x3 supercell at Gamma have the
    generalised eigenvalues of the cell at k = 0, 1/3, 2/3, and S is the exact overlap
    of ``atoms.repeat`` (the same atom order)."""
    import scipy.linalg as la

    from ase_gearsh.core.data import Dataset
    from gpaw_tools.overlap import OverlapCalculator, species_from_gpaw

    s = Dataset(chain_dataset)[0]
    H, S = s.blocks("H"), s.blocks("S")
    Hs, Ss = H.supercell((1, 1, 3)), S.supercell((1, 1, 3))
    assert Hs.n_atoms == 3 * H.n_atoms and Hs.n_orbitals == 3 * H.n_orbitals
    sc = la.eigh(Hs.matrix(sparse=False), Ss.matrix(sparse=False), eigvals_only=True)
    folded = np.sort(
        np.concatenate(
            [
                la.eigh(H.matrix(k, sparse=False), S.matrix(k, sparse=False), eigvals_only=True)
                for k in ([0, 0, 0], [0, 0, 1 / 3], [0, 0, 2 / 3])
            ]
        )
    )
    assert np.ptp(folded) > 10 and np.abs(sc - folded).max() < 1e-8
    species = species_from_gpaw(sorted(set(s.atoms.get_chemical_symbols())), "PBE", "szp(dzp)")
    exact = OverlapCalculator(species).overlap(s.atoms.repeat((1, 1, 3))).toarray()
    assert np.abs(Ss.matrix(sparse=False) - exact).max() < 1e-10
    with pytest.raises(ValueError, match=r"repeat must be three integers >= 1; got \(1, 0, 2\)"):
        H.supercell((1, 0, 2))


def test_half_precision_blocks_take_the_numpy_path():
    """Sources the compiled writer does not take (float16) give the same matrix."""
    counts = np.array([2, 3])
    onsite = np.arange(13, dtype=np.float16)
    pairs = np.arange(6, dtype=np.float16)
    M = BlockMatrices(counts, np.array([0]), np.array([1]), np.array([[0, 0, 1]]), onsite, pairs)
    ref = BlockMatrices(
        counts,
        np.array([0]),
        np.array([1]),
        np.array([[0, 0, 1]]),
        onsite.astype(float),
        pairs.astype(float),
    )
    np.testing.assert_array_equal(M.matrix().toarray(), ref.matrix().toarray())
