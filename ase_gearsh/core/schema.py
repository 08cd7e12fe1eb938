"""The on-disk dataset schema, shared by ``gpaw_tools`` (writer) and ``ase_gearsh`` (reader).

numpy only: importing this module must not import JAX or GPAW.

A dataset is a directory::

    DATASET/
        dataset.json          # {"format": FORMAT, "schema_version": N, "units": {...}}
        <name>.npz            # one structure per file, sorted by name

Each structure file is an uncompressed ``.npz`` archive that loads with
``allow_pickle=False``.  Metadata is a JSON text stored in the ``meta`` array.
See ``docs/dataset.md`` for the description of every field.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import GearsHError
from .io import atomic_write, atomic_write_bytes

FORMAT = "gearsh-hamiltonian-dataset"
SCHEMA_VERSION = 1
UNITS = {"energy": "eV", "length": "Angstrom", "kpoints": "scaled (reciprocal cell)"}
MANIFEST = "dataset.json"

# name -> (dtype kind, number of dimensions, description).  The leading
# dimension of the spin-resolved arrays is the spin channel.
ARRAYS = {
    "numbers": ("i", 1, "atomic numbers (N,)"),
    "positions": ("f", 2, "Cartesian positions (N, 3), Angstrom"),
    "cell": ("f", 2, "cell vectors as rows (3, 3), Angstrom"),
    "pbc": ("b", 1, "periodic boundary conditions (3,)"),
    "orbital_counts": ("i", 1, "basis functions per atom (N,)"),
    "onsite_H": ("f", 2, "on-site H blocks (nspins, sum_i n_i*n_i), eV, row-major per atom"),
    "onsite_S": ("f", 1, "on-site S blocks (sum_i n_i*n_i), row-major per atom"),
    "pair_ij": ("i", 2, "atom indices (P, 2) of the unordered pairs, i <= j"),
    "pair_shift": ("i", 2, "lattice shift R of atom j (P, 3), integer cell units"),
    "pair_vector": ("f", 2, "r_j + R @ cell - r_i (P, 3), Angstrom"),
    "pair_offsets": ("i", 1, "start of each pair block in pair_H/pair_S (P + 1,)"),
    "pair_H": ("f", 2, "pair blocks H_ij(R) (nspins, sum_p n_i*n_j), eV, row-major"),
    "pair_S": ("f", 1, "pair blocks S_ij(R) (sum_p n_i*n_j), row-major"),
    "kpts": ("f", 2, "k-points of the run (nk, 3), scaled"),
    "kpt_weights": ("f", 1, "k-point weights (nk,), summing to 1"),
    "eigenvalues": ("f", 3, "GPAW eigenvalues (nspins, nk, nbands), eV"),
}
META_REQUIRED = (
    "format",
    "schema_version",
    "units",
    "fermi_level",
    "n_electrons",
    "total_energy",
    "nspins",
    "basis",
    "kgrid",
    "source",
    "gpaw",
)


class SchemaError(GearsHError, ValueError):
    """A dataset file does not follow the expected schema."""


def ensure_manifest(directory) -> Path:
    """Create the dataset directory and its manifest if needed; check it otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"dataset path {str(directory)!r} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create dataset directory {str(directory)!r}: {err}") from err
    manifest = directory / MANIFEST
    if manifest.exists():
        read_manifest(directory)
    else:
        text = json.dumps(
            {"format": FORMAT, "schema_version": SCHEMA_VERSION, "units": UNITS}, indent=1
        )
        atomic_write_bytes(manifest, text.encode())
    return manifest


def read_manifest(directory) -> dict:
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        raise SchemaError(f"{str(directory)!r} is not a dataset: {MANIFEST} is missing")
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise SchemaError(f"unreadable dataset manifest {str(manifest)!r}: {err}") from err
    _check_version(info, str(manifest))
    return info


def _check_version(meta: dict, where: str) -> None:
    if meta.get("format") != FORMAT:
        raise SchemaError(f"{where}: expected format {FORMAT!r}, found {meta.get('format')!r}")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: schema version {version!r} is not supported by this version of "
            f"ase_gearsh (expected {SCHEMA_VERSION}); re-extract the data with the "
            f"matching gpaw_tools"
        )


def write_structure(path, arrays: dict, meta: dict, exclusive: bool = False) -> None:
    """Validate and atomically write one structure file (``exclusive``: never replace
    an existing file, ``FileExistsError`` instead, also against a concurrent writer)."""
    meta = dict(meta, format=FORMAT, schema_version=SCHEMA_VERSION, units=UNITS)
    validate(arrays, meta, str(path))
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["meta"] = np.array(json.dumps(meta))

    def write(fh):
        np.savez(fh, **payload)

    atomic_write(Path(path), write, exclusive=exclusive)


def read_structure(path) -> tuple[dict, dict]:
    """Read one structure file without executing code (no pickle)."""
    path = str(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise SchemaError(f"cannot read dataset file {path!r}: {err}") from err
    if "meta" not in arrays:
        raise SchemaError(f"{path!r} has no 'meta' entry: not a dataset structure file")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as err:
        raise SchemaError(f"{path!r}: metadata is not valid JSON: {err}") from err
    validate(arrays, meta, path)
    return arrays, meta


def validate(arrays: dict, meta: dict, where: str = "structure") -> None:
    """Check names, dtypes, shapes and block sizes; raise :class:`SchemaError`."""
    _check_version(meta, where)
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise SchemaError(f"{where}: metadata is missing {missing}")
    for name, (kind, ndim, desc) in ARRAYS.items():
        if name not in arrays:
            raise SchemaError(f"{where}: array {name!r} ({desc}) is missing")
        a = np.asarray(arrays[name])
        if a.dtype.kind != kind or a.ndim != ndim:
            raise SchemaError(
                f"{where}: array {name!r} should be {ndim}-d of kind {kind!r} ({desc}), "
                f"got {a.ndim}-d {a.dtype}"
            )
    n = len(arrays["numbers"])
    nspins = int(meta["nspins"])
    counts = np.asarray(arrays["orbital_counts"], dtype=np.int64)
    P = len(arrays["pair_ij"])
    offsets = np.asarray(arrays["pair_offsets"], dtype=np.int64)
    ij = np.asarray(arrays["pair_ij"], dtype=np.int64)
    expected = {
        "positions": (n, 3),
        "cell": (3, 3),
        "pbc": (3,),
        "orbital_counts": (n,),
        "onsite_H": (nspins, int((counts**2).sum())),
        "onsite_S": (int((counts**2).sum()),),
        "pair_shift": (P, 3),
        "pair_vector": (P, 3),
        "pair_offsets": (P + 1,),
        "pair_H": (nspins, int(offsets[-1]) if len(offsets) else 0),
        "pair_S": (int(offsets[-1]) if len(offsets) else 0,),
    }
    for name, shape in expected.items():
        if tuple(np.shape(arrays[name])) != shape:
            raise SchemaError(
                f"{where}: array {name!r} has shape "
                f"{tuple(np.shape(arrays[name]))}, expected {shape}"
            )
    if P:
        if ij.min() < 0 or ij.max() >= n:
            raise SchemaError(f"{where}: pair_ij indices outside 0..{n - 1}")
        sizes = counts[ij[:, 0]] * counts[ij[:, 1]]
        if offsets[0] != 0 or not np.array_equal(np.diff(offsets), sizes):
            raise SchemaError(
                f"{where}: pair_offsets do not match the block sizes "
                "n_i * n_j given by orbital_counts"
            )
    bad = [
        k for k, (kind, _, _) in ARRAYS.items() if kind == "f" and not np.isfinite(arrays[k]).all()
    ]
    if bad:
        raise SchemaError(f"{where}: array(s) {bad} hold NaN or inf values")
    nk = len(arrays["kpts"])
    if np.shape(arrays["eigenvalues"])[:2] != (nspins, nk):
        raise SchemaError(
            f"{where}: eigenvalues should start with (nspins, nk) = "
            f"({nspins}, {nk}), got {np.shape(arrays['eigenvalues'])}"
        )
