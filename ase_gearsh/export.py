"""Export of the predicted H and the exact S to sisl, TBtrans and SIESTA files.

>>> from ase_gearsh.export import to_sisl
>>> atoms.calc = GearsHCalculator("model.ckpt")
>>> H = to_sisl(atoms.calc)                  # sisl.Hamiltonian, non-orthogonal (H and S)
>>> H.eigh(k=[0, 0, 0.25])                   # the calculator's eigenvalues at that k
>>> H.write("device.TSHS")                   # TBtrans / TranSiesta input

``gearsh export STRUCTURE -m MODEL -o OUT.TSHS`` does the same from a structure file
(:func:`export_structure`; :func:`register` adds the subcommand to a parser).

Conventions
-----------
* Orbitals keep GPAW's order (atom, radial function, m = -l..l); H in eV, lengths
  in Angstrom.  Each atom is a :class:`sisl.Atom` (tag = chemical symbol) with one
  :class:`sisl.AtomicOrbital` per basis function: ``l`` and ``m`` as in the model's
  basis, the radius of its radial function, and ``n``, ``zeta`` and the polarisation
  flag as labels derived from the free atom's ground-state configuration (repeated
  radial functions of one ``l`` count as zeta 2, 3 ..; an ``l`` that is not occupied
  in the free atom is a polarisation orbital).  The labels do not enter any number.
* Every lattice shift R of H or S is kept: the sisl supercell has
  ``nsc = 2 max|R| + 1`` along each periodic direction and 1 along the others.  The
  matrix element of orbital i in the cell and orbital j in cell R is
  ``M_ij(R)``, so sisl's ``Hk(k)``/``Sk(k)`` in its default lattice gauge equal the
  calculator's Bloch sum ``sum_R exp(2 pi i k.R) M(R)`` and its eigenvalues at any k
  are the calculator's.
* S(R) is exact: the calculator's S(k) on a Gamma-centred k-grid that separates
  every periodic image, Fourier transformed back (the range of S, with its PAW
  term, comes from :func:`gpaw_tools.interactions.find_interactions`).
* Energies are absolute (the model's reference, as in ``get_eigenvalues``); the
  files record no Fermi level.  With ``kpts`` :func:`export_structure` reports the
  calculator's Fermi level so that TBtrans energy windows can be placed around it.
* Formats (:data:`FORMATS`, chosen by ``fmt`` or the file's suffix): ``TSHS``
  (TBtrans/TranSiesta: geometry, H, S and supercell, orbitals per atom but no
  species; read it back with ``read_hamiltonian(geometry=...)`` to restore them),
  ``HSX`` (SIESTA: also species and n, l, m, zeta of every orbital) and, when the
  netCDF4 package is installed, ``nc`` (SIESTA netCDF).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from ase import Atoms
from ase.data import atomic_numbers
from ase.units import Bohr

from gpaw_tools.interactions import find_interactions, required_grid

from .calculator import GearsHCalculator
from .core.basis import SpeciesBasis
from .core.blocks import BlockMatrices, block_indices, orbital_offsets
from .core.errors import GearsHError
from .core.io import OutputLock, OutputPathError
from .predict import _read_structure, parse_kpts

__all__ = [
    "to_sisl",
    "blocks_to_sisl",
    "overlap_blocks",
    "write_sisl",
    "export_structure",
    "register",
    "resolve_format",
    "supported_formats",
    "ExportError",
    "FORMATS",
]

# suffix -> (description, Python module it needs beyond sisl, or None)
FORMATS = {
    "TSHS": ("TBtrans/TranSiesta Hamiltonian and overlap", None),
    "HSX": ("SIESTA Hamiltonian and overlap", None),
    "nc": ("SIESTA netCDF file", "netCDF4"),
}


class ExportError(GearsHError, ValueError):
    """An export format that cannot be written, or a model without what export needs."""


def supported_formats() -> dict[str, str]:
    """{format: description} of the formats this installation writes (``nc`` only
    with the netCDF4 package)."""
    return {
        name: desc
        for name, (desc, needs) in FORMATS.items()
        if needs is None or importlib.util.find_spec(needs) is not None
    }


def _format_list() -> str:
    out = [f"{name} ({desc})" for name, desc in supported_formats().items()]
    missing = [f"{n} (needs {FORMATS[n][1]})" for n in FORMATS if n not in supported_formats()]
    text = ", ".join(out)
    return text + (f"; not installed: {', '.join(missing)}" if missing else "")


def resolve_format(output, fmt: str | None = None) -> str:
    """The format name of :data:`FORMATS` for ``fmt`` (any case) or, when None, for the
    suffix of ``output``; :class:`ExportError` names the supported ones otherwise."""
    given = fmt if fmt is not None else Path(output).suffix.lstrip(".")
    where = "--format" if fmt is not None else f"the suffix of {str(output)!r}"
    key = {name.lower(): name for name in FORMATS}.get(str(given).lower())
    if key is None:
        raise ExportError(
            f"unknown export format {given!r} (from {where}); expected one of: {_format_list()}"
        )
    if key not in supported_formats():
        raise ExportError(
            f"format {key!r} needs the Python package {FORMATS[key][1]}, which is not "
            f"installed; install it or use one of: {_format_list()}"
        )
    return key


# -- sisl geometry and basis ------------------------------------------------------------
def _shell_labels(symbol: str, ls) -> list[tuple[int | None, int, bool]]:
    """(n, zeta, polarisation) of every radial function of ``symbol`` with angular
    momenta ``ls``, from the free atom's ground-state configuration (GPAW's table);
    n is None when the table is not available."""
    try:
        from gpaw.atom.configurations import configurations

        shells = [(n, l) for n, l, occ, _ in configurations[symbol][1] if occ > 0]
    except (ImportError, KeyError):
        shells = None
    out, seen = [], {}
    for l in ls:
        seen[l] = seen.get(l, 0) + 1
        if shells is None:
            out.append((None, seen[l], False))
            continue
        occupied = [n for n, ll in shells if ll == l]
        if occupied:
            out.append((max(occupied), seen[l], False))
        else:  # polarisation: the lowest shell of this l above the valence
            out.append((max([l + 1] + [n for n, _ in shells]), seen[l], True))
    return out


def _sisl_atom(symbol: str, basis: SpeciesBasis):
    """:class:`sisl.Atom` with one AtomicOrbital per basis function (GPAW order)."""
    import sisl

    orbitals = []
    labels = _shell_labels(symbol, basis.l)
    for (l, rmax, _), (n, zeta, pol) in zip(basis.basis, labels):
        l = int(l)
        for m in range(-l, l + 1):
            kw = dict(l=l, m=m, zeta=zeta, P=pol, R=float(rmax) * Bohr)
            if n is not None:
                kw["n"] = n
            orbitals.append(sisl.AtomicOrbital(**kw))
    return sisl.Atom(atomic_numbers[symbol], orbitals, tag=symbol)


def _full_cell(atoms: Atoms) -> np.ndarray:
    """The cell with zero vectors (non-periodic directions without a cell) replaced by
    orthogonal vectors spanning the atoms plus 10 A: sisl needs a regular cell."""
    cell = np.array(atoms.cell, float)
    zero = np.linalg.norm(cell, axis=1) < 1e-12
    if not zero.any():
        return cell
    given = cell[~zero]
    if len(given):
        _, _, vt = np.linalg.svd(given)
        free = vt[len(given) :]
    else:
        free = np.eye(3)
    pos = atoms.positions
    for axis, vec in zip(np.flatnonzero(zero), free):
        extent = np.ptp(pos @ vec) if len(pos) else 0.0
        cell[axis] = vec * (extent + 10.0)
    return cell


def _species_basis(model, symbols) -> dict[str, SpeciesBasis]:
    data = getattr(model, "basis_data", None) or {}
    missing = sorted(set(symbols) - set(data))
    if missing:
        raise ExportError(
            f"the model stores no basis functions for {missing}; expected basis data "
            f"for every element (add them with `gearsh attach-basis MODEL --xc XC`)"
        )
    return {
        s: (data[s] if isinstance(data[s], SpeciesBasis) else SpeciesBasis.from_dict(data[s]))
        for s in set(symbols)
    }


# -- real-space matrices ----------------------------------------------------------------
def overlap_blocks(calc: GearsHCalculator, atoms: Atoms | None = None) -> BlockMatrices:
    """Exact S(R) of the calculator's atoms as on-site and pair blocks (the pairs of
    :func:`~gpaw_tools.interactions.find_interactions`: every block the PAW overlap
    can reach), from ``calc.get_overlap`` on a Gamma-centred k-grid that separates all
    periodic images: ``S(R) = 1/N_k sum_k exp(-2 pi i k.R) S(k)``."""
    pb = calc.blocks(atoms)  # syncs the calculator to the atoms
    atoms = calc.atoms
    symbols = atoms.get_chemical_symbols()
    basis = _species_basis(calc.model, symbols)
    rc = np.array([basis[s].rc for s in symbols])
    rp = np.array([basis[s].projector_rc for s in symbols])
    inter = find_interactions(atoms, rc, rp)
    grid = required_grid(inter, atoms.pbc)
    axes = [np.arange(g) / g for g in grid]
    kpts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    counts = pb.orbital_counts
    off = orbital_offsets(counts)
    pi, pj = inter.ij[:, 0].astype(np.int64), inter.ij[:, 1].astype(np.int64)
    shift = inter.shift.astype(np.int64)
    r0, c0, _ = block_indices(counts, counts, off[:-1], off[:-1])
    r1, c1, blk = block_indices(counts[pi], counts[pj], off[pi], off[pj])
    onsite = np.zeros(len(r0), complex)
    pairs = np.zeros(len(r1), complex)
    for k in kpts:
        S = calc.get_overlap(kpt=k, atoms=atoms).tocsr()
        onsite += np.asarray(S[r0, c0]).ravel()
        pairs += np.asarray(S[r1, c1]).ravel() * np.exp(-2j * np.pi * (shift @ k))[blk]
    onsite /= len(kpts)
    pairs /= len(kpts)
    return BlockMatrices(counts, pi, pj, shift, onsite.real.copy(), pairs.real.copy())


def _supercell_csr(bm: BlockMatrices, lattice, no: int) -> sp.csr_matrix:
    """(no, no * n_s) CSR of sisl's layout: column ``isc * no + j`` is orbital j in
    supercell ``isc`` = lattice shift R, with ``M_ji(-R) = M_ij(R)^T`` filled in."""
    counts = bm.orbital_counts
    off = orbital_offsets(counts)
    r0, c0, _ = block_indices(counts, counts, off[:-1], off[:-1])
    r1, c1, blk = block_indices(
        counts[bm.pair_i], counts[bm.pair_j], off[bm.pair_i], off[bm.pair_j]
    )
    isc0 = lattice.sc_index(np.zeros(3, int))
    plus = np.asarray(lattice.sc_index(bm.pair_shift), np.int64).reshape(-1)
    minus = np.asarray(lattice.sc_index(-bm.pair_shift), np.int64).reshape(-1)
    rows = np.concatenate([r0, r1, c1])
    cols = np.concatenate([c0 + isc0 * no, c1 + plus[blk] * no, r1 + minus[blk] * no])
    data = np.concatenate([bm.onsite, bm.pairs, bm.pairs])
    n_s = int(np.prod(lattice.nsc))
    return sp.coo_matrix((data, (rows, cols)), shape=(no, no * n_s)).tocsr()  # sums duplicates


def blocks_to_sisl(atoms: Atoms, hamiltonian: BlockMatrices, overlap: BlockMatrices, basis):
    """Non-orthogonal :class:`sisl.Hamiltonian` of ``atoms`` from real-space blocks of H
    (eV) and S (GPAW order, shifts in units of the cell), e.g. a dataset's GPAW blocks;
    ``basis``: {symbol: SpeciesBasis or its dict} of every element (orbital metadata)."""
    import sisl

    symbols = atoms.get_chemical_symbols()
    basis = {
        s: b if isinstance(b, SpeciesBasis) else SpeciesBasis.from_dict(b) for s, b in basis.items()
    }
    missing = sorted(set(symbols) - set(basis))
    if missing:
        raise ExportError(f"expected basis data for every element; none for {missing}")
    species = {s: _sisl_atom(s, basis[s]) for s in sorted(set(symbols))}
    counts = np.array([species[s].no for s in symbols])
    for name, bm in (("H", hamiltonian), ("S", overlap)):
        if not np.array_equal(bm.orbital_counts, counts):
            raise ExportError(
                f"{name} blocks have orbital counts {bm.orbital_counts.tolist()}; the basis "
                f"of {atoms.get_chemical_formula()} gives {counts.tolist()}"
            )
    shifts = np.concatenate([hamiltonian.pair_shift, overlap.pair_shift, np.zeros((1, 3), int)])
    reach = np.abs(shifts).max(axis=0)
    pbc = np.asarray(atoms.pbc, bool)
    if np.any(reach[~pbc]):
        raise ExportError(
            f"expected lattice shifts along periodic directions only (pbc={pbc.tolist()}), "
            f"got shifts up to {reach.tolist()}"
        )
    nsc = 2 * reach + 1
    bc = [
        [sisl.BoundaryCondition.PERIODIC] * 2 if p else [sisl.BoundaryCondition.UNKNOWN] * 2
        for p in pbc
    ]
    lattice = sisl.Lattice(_full_cell(atoms), nsc=nsc, boundary_condition=bc)
    geometry = sisl.Geometry(atoms.positions, [species[s] for s in symbols], lattice=lattice)
    no = geometry.no
    H = sisl.Hamiltonian.fromsp(
        geometry,
        _supercell_csr(hamiltonian, lattice, no),
        S=_supercell_csr(overlap, lattice, no),
    )
    return H


def to_sisl(calc: GearsHCalculator, atoms: Atoms | None = None):
    """The calculator's predicted H and exact S as a non-orthogonal
    :class:`sisl.Hamiltonian` (see the module docstring for the conventions).

    ``atoms``: as for the calculator's getters (None: the attached atoms)."""
    if not isinstance(calc, GearsHCalculator):
        raise ExportError(
            f"expected a GearsHCalculator (atoms.calc = calc), got {type(calc).__name__}"
        )
    H = calc.blocks(atoms)
    S = overlap_blocks(calc, atoms)
    atoms = calc.atoms
    return blocks_to_sisl(atoms, H, S, _species_basis(calc.model, atoms.get_chemical_symbols()))


# -- files ------------------------------------------------------------------------------
def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise OutputPathError(f"output {path} is a folder; expected a file name such as out.TSHS")
    if path.exists() and not overwrite:
        raise OutputPathError(
            f"output file {path} already exists; choose another or pass --overwrite "
            f"(overwrite=True) to replace it"
        )
    if not path.parent.is_dir():
        raise OutputPathError(f"output folder {path.parent} does not exist; expected a folder")


def write_sisl(H, output, fmt: str | None = None, overwrite: bool = False) -> Path:
    """Write a sisl Hamiltonian atomically: sisl writes a temporary file of format
    ``fmt`` (default: the suffix of ``output``) beside ``output``, which is then renamed
    to ``output``; an existing file is replaced only with ``overwrite``."""
    path = Path(output)
    key = resolve_format(path, fmt)
    _check_output(path, overwrite)
    with OutputLock(path, "output file (-o)"):
        _check_output(path, overwrite)  # again, now that we hold the lock
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part.{key}", dir=path.parent)
        os.close(fd)
        try:
            os.chmod(tmp, 0o644)  # a data file, not a private one (mkstemp makes 0600)
            H.write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic, and fails if path appeared meanwhile
                except FileExistsError:
                    raise OutputPathError(
                        f"output file {path} already exists; choose another or pass "
                        f"--overwrite (overwrite=True) to replace it"
                    ) from None
                os.unlink(tmp)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    return path


def export_structure(
    structure,
    model,
    output,
    fmt: str | None = None,
    overwrite: bool = False,
    kpts=None,
    index=-1,
    charge: float = 0.0,
    progress: bool = False,
    log=print,
) -> dict:
    """Predict H of one structure (a file for ``ase.io.read`` or Atoms), compute S and
    write both to ``output`` through sisl (format ``fmt`` or the file's suffix, see
    :data:`FORMATS`); an existing file is replaced only with ``overwrite``.

    With ``kpts`` (a k-point parameter of the calculator) the Fermi level is computed
    there and reported (the file keeps absolute energies).  Returns a summary dict and
    logs one line."""
    path = Path(output)
    key = resolve_format(path, fmt)
    _check_output(path, overwrite)
    atoms, name = _read_structure(structure, index)
    calc = GearsHCalculator(model, kpts=kpts, charge=charge, progress=progress)
    atoms.calc = calc
    H = to_sisl(calc)
    fermi = calc.get_fermi_level() if kpts is not None else None
    write_sisl(H, path, key, overwrite)
    nsc = [int(x) for x in H.geometry.nsc]
    summary = {
        "structure": name,
        "atoms": len(atoms),
        "orbitals": int(H.no),
        "lattice_shifts": int(np.prod(nsc)),
        "nsc": nsc,
        "format": key,
        "output": str(path),
        "fermi_level_eV": fermi,
    }
    ef = "" if fermi is None else f", E_F = {fermi:.4f} eV"
    shifts = summary["lattice_shifts"]
    log(
        f"{name}: {len(atoms)} atoms, {H.no} orbitals, {shifts} lattice "
        f"shift{'' if shifts == 1 else 's'} (nsc {'x'.join(map(str, nsc))}){ef}; "
        f"wrote {path} ({key})"
    )
    return summary


# -- command line -----------------------------------------------------------------------
def _export(args) -> None:
    export_structure(
        args.structure,
        args.model,
        args.output,
        fmt=args.format,
        overwrite=args.overwrite,
        kpts=parse_kpts(args.kpts),
        index=args.index,
        charge=args.charge,
        progress=not args.quiet,
    )


def register(subparsers) -> None:
    """Add ``export`` to an argparse ``subparsers`` object (``func(args)`` raises
    :class:`~ase_gearsh.core.errors.GearsHError` subclasses for user errors)."""
    e = subparsers.add_parser(
        "export",
        help="predicted H and exact S to a TBtrans/TranSiesta (.TSHS) or other sisl file",
    )
    e.add_argument("structure", help="any file ase.io.read understands")
    e.add_argument("-m", "--model", required=True, help="model.ckpt")
    e.add_argument("-o", "--output", required=True, help="file to write, e.g. device.TSHS")
    e.add_argument(
        "--format",
        help=f"file format (default: the suffix of -o): {', '.join(FORMATS)} (nc needs netCDF4)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    e.add_argument("--kpts", help="Gamma-centred k-grid, e.g. 1,1,12: report the Fermi level there")
    e.add_argument("--charge", type=float, default=0.0, help="net charge (e), for the Fermi level")
    e.add_argument("--index", default=-1, help="frame of a multi-frame file (default last)")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_export)
