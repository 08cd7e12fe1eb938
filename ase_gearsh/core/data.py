"""Reading Hamiltonian datasets (numpy, scipy and ASE only; no JAX at import).

>>> from ase_gearsh.core.data import Dataset
>>> ds = Dataset("dataset/")
>>> s = ds[0]
>>> H = s.hamiltonian()          # dense (M, M) in eV at Gamma, GPAW orbital order
>>> Hk = s.hamiltonian(kpt=[0, 0, 0.25])   # complex, from the real-space blocks
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from .blocks import BlockMatrices, assemble, orbital_offsets
from .schema import MANIFEST, SchemaError, read_manifest, read_structure

__all__ = ["Dataset", "Structure", "assemble", "orbital_offsets", "check_dataset"]


class Structure:
    """One structure of a dataset: atoms, blocks, reference data and metadata."""

    def __init__(self, arrays: dict, meta: dict, path: Path | None = None):
        self.arrays = arrays
        self.meta = meta
        self.path = path

    def __repr__(self):
        return (
            f"Structure({self.atoms.get_chemical_formula()!r}, "
            f"orbitals={self.n_orbitals}, pairs={len(self.arrays['pair_ij'])}, "
            f"kgrid={tuple(self.meta['kgrid'])}, source={self.meta['source']['name']!r})"
        )

    @cached_property
    def atoms(self):
        from ase import Atoms

        a = self.arrays
        return Atoms(numbers=a["numbers"], positions=a["positions"], cell=a["cell"], pbc=a["pbc"])

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
            raise IndexError(
                f"spin {spin} out of range: this structure has {self.nspins} spin channel(s)"
            )

    def hamiltonian(self, kpt=None, spin: int = 0, sparse: bool = False):
        """H(k) in eV, GPAW orbital order; ``kpt`` is a scaled k-vector (None: Gamma)."""
        self._check_spin(spin)
        a = self.arrays
        return assemble(
            a["orbital_counts"],
            a["onsite_H"][spin],
            a["pair_ij"],
            a["pair_shift"],
            a["pair_H"][spin],
            kpt=kpt,
            sparse=sparse,
        )

    def blocks(self, which: str = "H", spin: int = 0) -> BlockMatrices:
        """The real-space H (or S) blocks as :class:`~ase_gearsh.core.blocks.BlockMatrices`."""
        a = self.arrays
        if which == "H":
            self._check_spin(spin)
            on, pr = a["onsite_H"][spin], a["pair_H"][spin]
        elif which == "S":
            on, pr = a["onsite_S"], a["pair_S"]
        else:
            raise ValueError(f"which must be 'H' or 'S', got {which!r}")
        return BlockMatrices.from_arrays(
            a["orbital_counts"],
            np.asarray(on, float),
            a["pair_ij"],
            a["pair_shift"],
            np.asarray(pr, float),
            pair_distance=np.linalg.norm(
                np.asarray(a["pair_vector"], float).reshape(-1, 3), axis=1
            ),
        )

    def overlap(self, kpt=None, sparse: bool = False):
        """S(k), GPAW orbital order; ``kpt`` is a scaled k-vector (None: Gamma)."""
        a = self.arrays
        return assemble(
            a["orbital_counts"],
            a["onsite_S"],
            a["pair_ij"],
            a["pair_shift"],
            a["pair_S"],
            kpt=kpt,
            sparse=sparse,
        )

    def eigenvalues(self, kpt=None, spin: int = 0) -> np.ndarray:
        """Eigenvalues (eV) of the generalised problem H(k) c = e S(k) c."""
        from scipy.linalg import eigh

        return eigh(self.hamiltonian(kpt, spin), self.overlap(kpt), eigvals_only=True)

    def onsite_blocks(self, which: str = "H", spin: int = 0) -> list[np.ndarray]:
        """On-site blocks as a list of (n_i, n_i) arrays."""
        data = self.arrays["onsite_H"][spin] if which == "H" else self.arrays["onsite_S"]
        counts = self.orbital_counts
        off = orbital_offsets(counts**2)
        return [data[off[a] : off[a + 1]].reshape(n, n) for a, n in enumerate(counts)]

    def pair_blocks(self, which: str = "H", spin: int = 0) -> list[np.ndarray]:
        """Pair blocks H_ij(R) as a list of (n_i, n_j) arrays, in ``pair_ij`` order."""
        a = self.arrays
        data = a["pair_H"][spin] if which == "H" else a["pair_S"]
        off = a["pair_offsets"]
        counts = self.orbital_counts
        return [
            data[off[p] : off[p + 1]].reshape(counts[i], counts[j])
            for p, (i, j) in enumerate(a["pair_ij"])
        ]


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
            raise IndexError(
                f"structure {index} out of range: the dataset has {len(self)}"
            ) from None
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


def check_dataset(path, eigenvalue_tolerance: float = 1e-3) -> tuple[int, list[tuple[str, str]]]:
    """Health of a dataset folder: ``(number of good structures, problems)``, each
    problem ``(file, what is wrong)``.

    Checks the manifest; that every ``.npz`` reads and follows the schema (shapes,
    block sizes, finite values); that the entries agree with each other (one
    functional, one basis per element, one spin setting); that no source was
    extracted twice; the eigenvalue check recorded at extraction (refused above
    ``eigenvalue_tolerance`` eV); and left-over temporary files of killed writes.
    Raises :class:`SchemaError` only if ``path`` is not a dataset at all.
    """
    path = Path(path)
    if not path.is_dir():
        raise SchemaError(f"{str(path)!r} is not a dataset folder (it does not exist)")
    read_manifest(path)
    problems: list[tuple[str, str]] = []
    for tmp in sorted(path.glob(".*.part")):
        problems.append((tmp.name, "temporary file of an interrupted write (safe to delete)"))
    first: dict = {}  # property -> (value, file) of the first structure
    sources: dict = {}
    good = 0
    for f in sorted(p for p in path.glob("*.npz") if not p.name.startswith(".")):
        try:
            arrays, meta = read_structure(f)
        except SchemaError as err:
            problems.append((f.name, str(err)))
            continue
        ok = True
        counts = {}
        for z, n in zip(arrays["numbers"].tolist(), arrays["orbital_counts"].tolist()):
            counts.setdefault(z, n)
        facts = {"xc": meta.get("xc"), "nspins": int(meta["nspins"])}
        facts.update({f"orbitals of Z={z}": n for z, n in counts.items()})
        for key, value in facts.items():
            ref = first.setdefault(key, (value, f.name))
            if ref[0] != value:
                problems.append((f.name, f"{key} is {value!r}, but {ref[0]!r} in {ref[1]}"))
                ok = False
        sha = (meta.get("source") or {}).get("sha256")
        if sha:
            if sha in sources:
                problems.append((f.name, f"the same source file as {sources[sha]} (duplicate)"))
                ok = False
            sources.setdefault(sha, f.name)
        err = (meta.get("checks") or {}).get("max_eigenvalue_error")
        if err is not None and not err <= eigenvalue_tolerance:
            problems.append(
                (
                    f.name,
                    f"its blocks rebuild GPAW's eigenvalues only to {err:.3g} eV at "
                    f"extraction (expected <= {eigenvalue_tolerance:g} eV)",
                )
            )
            ok = False
        good += ok
    return good, problems
