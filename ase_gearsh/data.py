"""Reading Hamiltonian datasets (numpy, scipy and ASE only; no JAX at import).

>>> from ase_gearsh.data import Dataset
>>> ds = Dataset("dataset/")
>>> s = ds[0]
>>> H = s.hamiltonian()          # dense (M, M) in eV at Gamma, GPAW orbital order
>>> Hk = s.hamiltonian(kpt=[0, 0, 0.25])   # complex, from the real-space blocks
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .schema import MANIFEST, SchemaError, read_manifest, read_structure

__all__ = ["Dataset", "Structure", "assemble", "orbital_offsets"]


def orbital_offsets(orbital_counts) -> np.ndarray:
    """First orbital index of every atom, plus the total, (N + 1,)."""
    return np.concatenate([[0], np.cumsum(orbital_counts)]).astype(np.int64)


def _block_indices(counts_i, counts_j, start_i, start_j):
    """Row and column indices of consecutive row-major blocks, vectorised."""
    sizes = counts_i * counts_j
    total = int(sizes.sum())
    block = np.repeat(np.arange(len(sizes)), sizes)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    local = np.arange(total) - first[block]
    nj = counts_j[block]
    rows = start_i[block] + local // nj
    cols = start_j[block] + local % nj
    return rows, cols, block


def assemble(orbital_counts, onsite, pair_ij, pair_shift, pair_blocks, kpt=None,
             sparse=False):
    """Build H(k) (or S(k)) from on-site and unordered pair blocks.

    ``H(k) = sum_R exp(2 pi i k.R) H(R)`` with ``H_ji(-R) = H_ij(R)^T``.
    ``onsite`` and ``pair_blocks`` are the flat row-major block arrays of one
    spin channel.  Returns a real matrix at Gamma (``kpt`` None or zero) and a
    complex Hermitian one otherwise; dense numpy unless ``sparse`` is true
    (then ``scipy.sparse.csr_matrix``).
    """
    counts = np.asarray(orbital_counts, dtype=np.int64)
    off = orbital_offsets(counts)
    M = int(off[-1])
    pair_ij = np.asarray(pair_ij, dtype=np.int64).reshape(-1, 2)
    pair_shift = np.asarray(pair_shift).reshape(-1, 3)
    onsite = np.asarray(onsite)
    pair_blocks = np.asarray(pair_blocks)
    if onsite.shape != (int((counts ** 2).sum()),):
        raise ValueError(f"expected {int((counts ** 2).sum())} on-site values, "
                         f"got shape {onsite.shape}")
    r0, c0, _ = _block_indices(counts, counts, off[:-1], off[:-1])
    i, j = pair_ij[:, 0], pair_ij[:, 1]
    r1, c1, blk = _block_indices(counts[i], counts[j], off[i], off[j])
    if pair_blocks.shape != (len(r1),):
        raise ValueError(f"expected {len(r1)} pair-block values, got shape "
                         f"{pair_blocks.shape}")
    gamma = kpt is None or not np.any(np.asarray(kpt, dtype=float))
    if gamma:
        values = pair_blocks
        dtype = np.result_type(onsite, pair_blocks, np.float64)
        tvalues = values
    else:
        k = np.asarray(kpt, dtype=float).reshape(3)
        phase = np.exp(2j * np.pi * (pair_shift @ k))
        values = pair_blocks * phase[blk]
        tvalues = np.conj(values)
        dtype = np.complex128
    rows = np.concatenate([r0, r1, c1])
    cols = np.concatenate([c0, c1, r1])
    data = np.concatenate([onsite, values, tvalues]).astype(dtype, copy=False)
    mat = sp.coo_matrix((data, (rows, cols)), shape=(M, M)).tocsr()  # sums duplicates
    return mat if sparse else mat.toarray()


class Structure:
    """One structure of a dataset: atoms, blocks, reference data and metadata."""

    def __init__(self, arrays: dict, meta: dict, path: Path | None = None):
        self.arrays = arrays
        self.meta = meta
        self.path = path

    def __repr__(self):
        return (f"Structure({self.atoms.get_chemical_formula()!r}, "
                f"orbitals={self.n_orbitals}, pairs={len(self.arrays['pair_ij'])}, "
                f"kgrid={tuple(self.meta['kgrid'])}, source={self.meta['source']['name']!r})")

    @cached_property
    def atoms(self):
        from ase import Atoms
        a = self.arrays
        return Atoms(numbers=a["numbers"], positions=a["positions"], cell=a["cell"],
                     pbc=a["pbc"])

    @property
    def fermi_level(self) -> float:
        """Fermi level in eV (the mean of the two levels for fixed-moment runs)."""
        ef = self.meta["fermi_level"]
        return float(np.mean(ef))

    @property
    def n_electrons(self) -> float:
        return float(self.meta["n_electrons"])

    @property
    def total_energy(self) -> float:
        return float(self.meta["total_energy"])

    @property
    def nspins(self) -> int:
        return int(self.meta["nspins"])

    @property
    def basis(self) -> dict:
        """Per-species basis: name, l of each radial function, cut-off radii (A)."""
        return self.meta["basis"]

    @property
    def reference_eigenvalues(self) -> np.ndarray:
        """GPAW's eigenvalues (nspins, nk, nbands) in eV at ``reference_kpts``."""
        return self.arrays["eigenvalues"]

    @property
    def reference_kpts(self) -> np.ndarray:
        return self.arrays["kpts"]

    @property
    def orbital_counts(self) -> np.ndarray:
        return self.arrays["orbital_counts"]

    @property
    def n_orbitals(self) -> int:
        return int(self.arrays["orbital_counts"].sum())

    def orbital_slices(self) -> list[slice]:
        off = orbital_offsets(self.orbital_counts)
        return [slice(int(a), int(b)) for a, b in zip(off[:-1], off[1:])]

    def _check_spin(self, spin):
        if not 0 <= spin < self.nspins:
            raise IndexError(f"spin {spin} out of range: this structure has "
                             f"{self.nspins} spin channel(s)")

    def hamiltonian(self, kpt=None, spin: int = 0, sparse: bool = False):
        """H(k) in eV, GPAW orbital order; ``kpt`` is a scaled k-vector (None: Gamma)."""
        self._check_spin(spin)
        a = self.arrays
        return assemble(a["orbital_counts"], a["onsite_H"][spin], a["pair_ij"],
                        a["pair_shift"], a["pair_H"][spin], kpt=kpt, sparse=sparse)

    def overlap(self, kpt=None, sparse: bool = False):
        """S(k), GPAW orbital order; ``kpt`` is a scaled k-vector (None: Gamma)."""
        a = self.arrays
        return assemble(a["orbital_counts"], a["onsite_S"], a["pair_ij"], a["pair_shift"],
                        a["pair_S"], kpt=kpt, sparse=sparse)

    def eigenvalues(self, kpt=None, spin: int = 0) -> np.ndarray:
        """Eigenvalues (eV) of the generalised problem H(k) c = e S(k) c."""
        from scipy.linalg import eigh
        return eigh(self.hamiltonian(kpt, spin), self.overlap(kpt), eigvals_only=True)

    def onsite_blocks(self, which: str = "H", spin: int = 0) -> list[np.ndarray]:
        """On-site blocks as a list of (n_i, n_i) arrays."""
        data = self.arrays["onsite_H"][spin] if which == "H" else self.arrays["onsite_S"]
        counts = self.orbital_counts
        off = orbital_offsets(counts ** 2)
        return [data[off[a]:off[a + 1]].reshape(n, n) for a, n in enumerate(counts)]

    def pair_blocks(self, which: str = "H", spin: int = 0) -> list[np.ndarray]:
        """Pair blocks H_ij(R) as a list of (n_i, n_j) arrays, in ``pair_ij`` order."""
        a = self.arrays
        data = a["pair_H"][spin] if which == "H" else a["pair_S"]
        off = a["pair_offsets"]
        counts = self.orbital_counts
        return [data[off[p]:off[p + 1]].reshape(counts[i], counts[j])
                for p, (i, j) in enumerate(a["pair_ij"])]


class Dataset:
    """A directory of structures written by ``python -m gpaw_tools.extract``.

    Structures are ordered by file name; loading never executes code.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"dataset directory {str(self.path)!r} does not exist")
        self.info = read_manifest(self.path)
        self.files = sorted(p for p in self.path.glob("*.npz") if not p.name.startswith("."))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index) -> Structure:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        try:
            path = self.files[index]
        except IndexError:
            raise IndexError(f"structure {index} out of range: the dataset has "
                             f"{len(self)}") from None
        arrays, meta = read_structure(path)
        return Structure(arrays, meta, path)

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def __repr__(self):
        return f"Dataset({str(self.path)!r}, structures={len(self)})"

    @property
    def names(self) -> list[str]:
        return [p.stem for p in self.files]


__all__ += ["SchemaError", "MANIFEST"]
