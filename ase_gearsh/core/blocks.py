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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from . import processes
from .compiled import compiled

__all__ = [
    "orbital_offsets",
    "block_indices",
    "canonical_orientation",
    "csr_layout",
    "BlockMatrices",
    "assemble",
]


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


def csr_layout(orbital_counts, pair_i, pair_j):
    """The CSR layout of M(k) of on-site blocks and unordered pair blocks (the same at
    every k; :meth:`BlockMatrices.matrix`): (indptr, indices, groups, unique).
    ``groups`` lists, per kind of block (0 on-site, 1 pair, 2 pair transposed) and block
    shape, the blocks' first source value, first CSR entry of their first row, row
    length and column offset; ``unique`` is false when several blocks share an atom
    pair (images in a small cell): they are summed.  Depends only on the atoms' orbital
    counts and the pairs, so it can be computed before the values exist."""
    counts = np.asarray(orbital_counts, np.int64)
    pi = np.asarray(pair_i, np.int64).reshape(-1)
    pj = np.asarray(pair_j, np.int64).reshape(-1)
    N = len(counts)
    off = orbital_offsets(counts)
    # directed blocks: on-site (a, a), pairs (i, j), transposes (j, i)
    I = np.concatenate([np.arange(N), pi, pj])
    J = np.concatenate([np.arange(N), pj, pi])
    uniq, inv = np.unique(I * N + J, return_inverse=True)  # sorted by row, column
    uI, uJ = uniq // N, uniq % N
    nJ = counts[uJ]
    rowlen = np.bincount(uI, weights=nJ, minlength=N).astype(np.int64)
    first_u = np.searchsorted(uI, np.arange(N))  # each atom's first block
    before = np.cumsum(nJ) - nJ
    colstart = before - before[first_u][uI]  # column offset of a block in its row
    base = np.concatenate([[0], np.cumsum(counts * rowlen)])  # first entry per atom
    # within atom a, orbital row r starts at base[a] + r * rowlen[a]
    atom_of_row = np.repeat(np.arange(N), counts)
    local_row = np.arange(len(atom_of_row)) - off[atom_of_row]
    indptr = np.append(base[atom_of_row] + local_row * rowlen[atom_of_row], base[-1])
    collist = _ranges(off[uJ], nJ)  # each atom's column list, atom after atom
    int_type = np.int32 if base[-1] < 2**31 else np.int64
    indices = np.empty(int(base[-1]), int_type)
    cfirst = before[first_u]
    for a in range(N):  # every row of atom a has a's column list
        rows = indices[base[a] : base[a + 1]].reshape(counts[a], rowlen[a])
        rows[:] = collist[cfirst[a] : cfirst[a] + rowlen[a]]
    # source offsets: on-site blocks in ``onsite``, pairs (and transposes) in ``pairs``
    on_sizes = counts**2
    pair_sizes = counts[pi] * counts[pj]
    src = np.concatenate(
        [np.cumsum(on_sizes) - on_sizes, np.tile(np.cumsum(pair_sizes) - pair_sizes, 2)]
    )
    kind = np.repeat([0, 1, 2], [N, len(pi), len(pi)])
    rows_n = np.concatenate([counts, counts[pi], counts[pi]])  # source block shape
    cols_n = np.concatenate([counts, counts[pj], counts[pj]])
    groups = []
    for key in np.unique(np.stack([kind, rows_n, cols_n], axis=1), axis=0):
        sel = np.flatnonzero((kind == key[0]) & (rows_n == key[1]) & (cols_n == key[2]))
        groups.append(
            (
                tuple(int(x) for x in key),
                src[sel],
                base[I[sel]],
                rowlen[I[sel]],
                colstart[inv[sel]],
            )
        )
    return indptr, indices, groups, len(uniq) == len(I)


def _ranges(starts, counts) -> np.ndarray:
    """Concatenation of arange(s, s + c) for all (s, c), vectorised."""
    counts = np.asarray(counts, np.int64)
    ends = np.cumsum(counts)
    shift = np.asarray(starts, np.int64) - (ends - counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(shift, counts)


def _fill_blocks(data, source, src, first, step, nr, nc, transpose, unique):
    """Write (or add, when blocks share an atom pair) K blocks of shape (nr, nc), read
    row-major from ``source[src[k]:]``, into CSR ``data``: element (a, b) of block k at
    ``first[k] + a * step[k] + b`` (``transpose``: at ``first[k] + b * step[k] + a``)."""
    for k in range(len(src)):
        s0, d0, st = src[k], first[k], step[k]
        for a in range(nr):
            for b in range(nc):
                d = d0 + b * st + a if transpose else d0 + a * st + b
                if unique:
                    data[d] = source[s0 + a * nc + b]
                else:
                    data[d] += source[s0 + a * nc + b]


# source dtypes the compiled writer takes (others, e.g. float16, use the numpy path)
_KERNEL_SOURCES = {np.dtype(t) for t in (np.float32, np.float64, np.complex64, np.complex128)}


def _fill_kernel():
    """:func:`_fill_blocks` compiled with numba (cached on disk), or None when numba is
    not installed (the core does not require it): the numpy path then writes the same
    values."""
    return compiled(_fill_blocks)


# values written by the compiled writer in threads from this many (below: one thread)
PARALLEL_FILL_MIN = 1 << 22


def _run_fill(kernel, data, tasks, unique: bool) -> None:
    """Run the compiled writer's ``tasks`` (source, src, first, step, nr, nc, transpose)
    into ``data``.  Large matrices whose blocks do not share entries (``unique``) are
    split over the usable cores (the kernel releases the GIL); blocks that are summed
    stay in one thread (no two threads add to the same entry)."""
    threads = processes.usable_cores()
    if not unique or threads < 2 or len(data) < PARALLEL_FILL_MIN:
        for t in tasks:
            kernel(data, *t, unique)
        return
    parts = []
    for source, src, first, step, nr, nc, transpose in tasks:
        for cut in np.array_split(np.arange(len(src)), threads):
            if len(cut):
                a, b = cut[0], cut[-1] + 1
                parts.append((source, src[a:b], first[a:b], step[a:b], nr, nc, transpose))
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda t: kernel(data, *t, unique), parts):
            pass


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

    def supercell(self, repeat) -> BlockMatrices:
        """The blocks of the (n1, n2, n3) supercell, atoms in the order of ASE's
        ``atoms.repeat(repeat)``: the real-space M(R) of a k-sampled extraction gives
        the supercell's matrix, whose Gamma point holds the eigenvalues of this cell at
        the k-points (m1/n1, m2/n2, m3/n3) (exactly: the same Fourier sum)."""
        rep = np.asarray(repeat, dtype=np.int64).reshape(-1)
        if rep.shape != (3,) or (rep < 1).any():
            raise ValueError(f"repeat must be three integers >= 1; got {repeat!r}")
        N, n_cells = self.n_atoms, int(rep.prod())
        cells = np.stack(np.unravel_index(np.arange(n_cells), tuple(rep)), axis=1)  # (C, 3)
        to = cells[:, None, :] + self.pair_shift[None, :, :]  # (C, P, 3) target cells
        shift = np.floor_divide(to, rep)
        target = np.ravel_multi_index(tuple(np.mod(to, rep).reshape(-1, 3).T), tuple(rep))
        first = (np.arange(n_cells)[:, None] * N + self.pair_i[None, :]).ravel()

        def tiled(x):
            return None if x is None else np.tile(np.asarray(x), n_cells)

        return BlockMatrices(
            orbital_counts=np.tile(self.orbital_counts, n_cells),
            pair_i=first,
            pair_j=target * N + np.tile(self.pair_j, n_cells),
            pair_shift=shift.reshape(-1, 3),
            onsite=tiled(self.onsite),
            pairs=tiled(self.pairs),
            pair_distance=tiled(self.pair_distance),
            neighbours=tiled(self.neighbours),
        )

    def _layout(self):
        """The CSR layout of M(k) (:func:`csr_layout`), computed once."""
        if not hasattr(self, "_csr"):
            self._csr = csr_layout(self.orbital_counts, self.pair_i, self.pair_j)
        return self._csr

    def adopt_layout(self, layout) -> None:
        """Use ``layout``, :func:`csr_layout` of these blocks computed elsewhere (e.g. in
        a thread while the network ran), instead of computing it again."""
        indptr = layout[0]
        if len(indptr) != self.n_orbitals + 1:
            raise ValueError(
                f"a CSR layout of {len(indptr) - 1} rows does not fit blocks of "
                f"{self.n_orbitals} orbitals"
            )
        self._csr = layout

    def matrix(self, kpt=None, sparse: bool = True):
        """M(k) at scaled ``kpt`` (None: Gamma): real at Gamma, complex Hermitian
        otherwise; scipy.sparse CSR (sorted indices, duplicates summed) unless
        ``sparse`` is false (dense numpy)."""
        n = self.n_orbitals
        indptr, indices, groups, unique = self._layout()
        gamma = kpt is None or not np.any(np.asarray(kpt, float))
        if gamma:
            v = self.pairs
            tv = v
            dtype = np.result_type(self.onsite, self.pairs, np.float64)
        else:
            k = np.asarray(kpt, float).reshape(3)
            sizes = self.orbital_counts[self.pair_i] * self.orbital_counts[self.pair_j]
            v = self.pairs * np.repeat(np.exp(2j * np.pi * (self.pair_shift @ k)), sizes)
            tv = np.conj(v)
            dtype = np.complex128
        sources = (self.onsite, v, tv)
        nnz = int(indptr[-1])
        data = np.zeros(nnz, dtype)
        kernel = _fill_kernel()
        tasks = []  # the compiled writer's calls
        for (kind, nr, nc), src, row0, rowlen, col0 in groups:
            if kernel is not None and sources[kind].dtype in _KERNEL_SOURCES:
                tasks.append((sources[kind], src, row0 + col0, rowlen, nr, nc, kind == 2))
                continue
            a = np.arange(nr)[None, :, None]  # the source block's rows and columns
            b = np.arange(nc)[None, None, :]
            first = (row0 + col0)[:, None, None]
            step = rowlen[:, None, None]
            # a transpose's source element (a, b) lands at row b, column a
            dest = first + (b * step + a if kind == 2 else a * step + b)
            values = sources[kind][src[:, None, None] + a * nc + b]
            if unique:
                data[dest] = values
            else:
                np.add.at(data, dest, values)
        _run_fill(kernel, data, tasks, unique)
        mat = sp.csr_matrix((data, indices, indptr.astype(indices.dtype)), shape=(n, n))
        mat.has_sorted_indices = True
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
