"""Hamiltonian and overlap blocks per atom pair, and their sparse assembly (numpy, scipy).

Conventions (shared by datasets, the model and the calculator):

* orbitals are in GPAW's order: atom, then radial function, then m;
* a *pair* is an unordered pair of atoms with a lattice shift, stored once in its
  canonical orientation: ``i < j``, or ``i == j`` with ``R > 0``
  lexicographically (:func:`canonical_orientation`);
* ``M(k) = sum_R exp(2 pi i k.R) M(R)`` with ``M_ji(-R) = M_ij(R)^T``;
* blocks are flat row-major arrays, on-site blocks atom by atom, pair blocks
  pair by pair (as in ``onsite_H``/``pair_H`` of a dataset file).

:class:`BlockMatrices` is the one sparse assembler of the project: datasets
(:func:`assemble`), predictions and the calculator all build H(k) through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

__all__ = ["orbital_offsets", "block_indices", "canonical_orientation", "BlockMatrices", "assemble"]


def orbital_offsets(orbital_counts) -> np.ndarray:
    """First orbital index of every atom, plus the total, (N + 1,)."""
    return np.concatenate([[0], np.cumsum(orbital_counts)]).astype(np.int64)


def block_indices(counts_i, counts_j, start_i, start_j):
    """Row and column indices of consecutive row-major blocks, vectorised.

    Returns ``(rows, cols, block)``: for every element of the concatenated blocks
    its matrix row, column and the index of the block it belongs to.
    """
    counts_i = np.asarray(counts_i, np.int64)
    counts_j = np.asarray(counts_j, np.int64)
    sizes = counts_i * counts_j
    total = int(sizes.sum())
    block = np.repeat(np.arange(len(sizes)), sizes)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    local = np.arange(total) - first[block]
    nj = counts_j[block]
    rows = np.asarray(start_i, np.int64)[block] + local // nj
    cols = np.asarray(start_j, np.int64)[block] + local % nj
    return rows, cols, block


def canonical_orientation(i, j, S) -> np.ndarray:
    """True where the directed pair (i, j, R) is the stored orientation of its
    unordered pair: i < j, or i == j with R > 0 lexicographically."""
    S = np.asarray(S).reshape(-1, 3)
    first = np.argmax(S != 0, axis=1)
    positive = S[np.arange(len(S)), first] > 0
    i, j = np.asarray(i), np.asarray(j)
    return (i < j) | ((i == j) & positive)


@dataclass
class BlockMatrices:
    """A real-space matrix (H or S) as on-site and unordered pair blocks, GPAW order.

    ``matrix(kpt)`` is ``sum_R exp(2 pi i k.R) M(R)`` with ``M_ji(-R) = M_ij(R)^T``.
    ``onsite`` and ``pairs`` are the flat row-major blocks (float64).
    """

    orbital_counts: np.ndarray  # (N,)
    pair_i: np.ndarray  # (P,)
    pair_j: np.ndarray  # (P,)
    pair_shift: np.ndarray  # (P, 3) int
    onsite: np.ndarray  # (sum_a n_a^2,)
    pairs: np.ndarray  # (sum_p n_i n_j,)
    pair_distance: np.ndarray | None = None  # (P,) Angstrom, when known
    neighbours: np.ndarray | None = None  # (N,) neighbours within the descriptor cut-off
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.orbital_counts = np.asarray(self.orbital_counts, np.int64)
        self.pair_i = np.asarray(self.pair_i, np.int64).reshape(-1)
        self.pair_j = np.asarray(self.pair_j, np.int64).reshape(-1)
        self.pair_shift = np.asarray(self.pair_shift, np.int64).reshape(-1, 3)
        counts = self.orbital_counts
        n_on = int((counts**2).sum())
        if np.shape(self.onsite) != (n_on,):
            raise ValueError(f"expected {n_on} on-site values, got shape {np.shape(self.onsite)}")
        n_pair = int((counts[self.pair_i] * counts[self.pair_j]).sum())
        if np.shape(self.pairs) != (n_pair,):
            raise ValueError(
                f"expected {n_pair} pair-block values, got shape {np.shape(self.pairs)}"
            )

    @classmethod
    def from_arrays(cls, orbital_counts, onsite, pair_ij, pair_shift, pairs, **kw):
        ij = np.asarray(pair_ij, np.int64).reshape(-1, 2)
        return cls(
            orbital_counts=orbital_counts,
            pair_i=ij[:, 0],
            pair_j=ij[:, 1],
            pair_shift=pair_shift,
            onsite=np.asarray(onsite),
            pairs=np.asarray(pairs),
            **kw,
        )

    @property
    def n_orbitals(self) -> int:
        return int(self.orbital_counts.sum())

    @property
    def n_atoms(self) -> int:
        return len(self.orbital_counts)

    def _indices(self):
        if not hasattr(self, "_idx"):
            counts = self.orbital_counts
            off = orbital_offsets(counts)
            r0, c0, _ = block_indices(counts, counts, off[:-1], off[:-1])
            r1, c1, blk = block_indices(
                counts[self.pair_i], counts[self.pair_j], off[self.pair_i], off[self.pair_j]
            )
            self._idx = (r0, c0, r1, c1, blk)
        return self._idx

    def matrix(self, kpt=None, sparse: bool = True):
        """M(k) at scaled ``kpt`` (None: Gamma): real at Gamma, complex Hermitian
        otherwise; scipy.sparse CSR unless ``sparse`` is false (dense numpy)."""
        n = self.n_orbitals
        r0, c0, r1, c1, blk = self._indices()
        gamma = kpt is None or not np.any(np.asarray(kpt, float))
        if gamma:
            v = self.pairs
            tv = v
            dtype = np.result_type(self.onsite, self.pairs, np.float64)
        else:
            k = np.asarray(kpt, float).reshape(3)
            v = self.pairs * np.exp(2j * np.pi * (self.pair_shift @ k))[blk]
            tv = np.conj(v)
            dtype = np.complex128
        rows = np.concatenate([r0, r1, c1])
        cols = np.concatenate([c0, c1, r1])
        data = np.concatenate([self.onsite, v, tv]).astype(dtype, copy=False)
        mat = sp.coo_matrix((data, (rows, cols)), shape=(n, n)).tocsr()  # sums duplicates
        return mat if sparse else mat.toarray()

    def flat(self):
        """(onsite, pairs): row-major blocks as stored in datasets."""
        return self.onsite, self.pairs

    def pair_values(self, p: int) -> np.ndarray:
        """Block of pair ``p`` as an (n_i, n_j) array."""
        counts = self.orbital_counts
        sizes = counts[self.pair_i] * counts[self.pair_j]
        start = int(sizes[:p].sum())
        return self.pairs[start : start + sizes[p]].reshape(
            counts[self.pair_i[p]], counts[self.pair_j[p]]
        )


def assemble(orbital_counts, onsite, pair_ij, pair_shift, pair_blocks, kpt=None, sparse=False):
    """Build H(k) (or S(k)) from on-site and unordered pair blocks (see
    :class:`BlockMatrices`).  Dense numpy unless ``sparse`` is true."""
    bm = BlockMatrices.from_arrays(orbital_counts, onsite, pair_ij, pair_shift, pair_blocks)
    return bm.matrix(kpt, sparse=sparse)
