"""``gearsh bands STRUCTURE -m model.ckpt -o OUT/ --path GXMG``: band structures.

The model's bands along a path of special points (ASE's names for the cell's
Bravais lattice, restricted to the periodic directions: a chain periodic along z
has ``GX`` along z), with the Fermi level from a Gamma-centred k-grid (the
eigenvalues of a path do not sample the Brillouin zone, so a path's own Fermi
level is wrong), and optionally GPAW's bands of the same structure on the same
k-points (``--reference RUN.gpw``: a fixed-density run from the .gpw's density)
for comparison.

The output folder is written as a unit (see :func:`ase_gearsh.core.io.output_folder`:
a failed run leaves no folder, or the old one untouched; an existing folder is
replaced only with ``overwrite``).  Everything is checked (output path, options,
structure, periodic directions, special points, the reference's structure)
before the model is run.  Contents:

* ``bands.csv``: ``k`` (index along the path), ``x`` (path coordinate, 1/Angstrom,
  2 pi included), ``kx, ky, kz`` (scaled, i.e. fractional, reciprocal
  coordinates), ``band``, ``energy_eV`` (absolute) and, with a reference,
  ``gpaw_energy_eV`` (empty beyond the bands GPAW computed);
* ``bands.json``: path, special points, k-grid and Fermi level, band gap along
  the path (model and reference), the comparison with the reference (mean and
  largest absolute eigenvalue error within E_F(GPAW) -+ 5 eV), reliability figure;
* ``bands.png``: bands against E - E_F (the model's E_F; the reference's bands,
  dashed, are shifted by the same amount so that the plot shows absolute errors).

Library use::

    calc = GearsHCalculator("model.ckpt")
    bs = model_bands(atoms, calc, "GXMG", npoints=100)   # ASE BandStructure, eV
    ref = reference_bands("run.gpw", bs.path, atoms=atoms)
    plot_bands("bands.png", bs, reference=ref)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import kptdensity2monkhorstpack
from ase.dft.kpoints import BandPath, parse_path_string
from ase.spectrum.band_structure import BandStructure

from .calculator import GearsHCalculator
from .core.errors import GearsHError
from .core.io import (
    atomic_write_text,
    check_output_folder,
    new_figure,
    output_folder,
    save_figure,
)
from .predict import _read_structure, reliability_summary

__all__ = [
    "BandsError",
    "DEFAULT_FERMI_DENSITY",
    "DEFAULT_FERMI_MAX_KPTS",
    "DEFAULT_NPOINTS",
    "MAE_WINDOW",
    "band_gap",
    "band_path",
    "bands_structure",
    "check_reference",
    "check_same_structure",
    "compare_bands",
    "fermi_grid",
    "load_reference",
    "model_bands",
    "plot_bands",
    "reference_bands",
    "register",
    "special_points",
    "write_bands_csv",
]

DEFAULT_NPOINTS = 100
# k-points per 1/Angstrom along each reciprocal vector (2 pi included, ASE's
# convention: n = ceil(2 pi density / d) for planes d Angstrom apart), at most
# DEFAULT_FERMI_MAX_KPTS points in all (the density is lowered until they fit):
# a 2.46 A chain gets 11 points, graphene 12x12, Si 9x9x9, diamond or Cu 10x10x10,
# a 20 A supercell 2 per direction
DEFAULT_FERMI_DENSITY = 4.0
DEFAULT_FERMI_MAX_KPTS = 1000
MAE_WINDOW = 5.0  # eV either side of the reference's Fermi level
STRUCTURE_TOLERANCE = 1e-3  # Angstrom: positions and cell of a reference .gpw


class BandsError(GearsHError, ValueError):
    """Unusable band-structure input: structure, path, options or reference."""


# -- k-points --------------------------------------------------------------------------
def _check_periodic(atoms: Atoms, name: str = "the structure") -> None:
    if not np.any(atoms.pbc):
        raise BandsError(
            f"band structures need at least one periodic direction; {name} has "
            f"pbc={np.asarray(atoms.pbc).tolist()} (a molecule: `gearsh predict` gives its levels)"
        )


def _check_npoints(npoints) -> int:
    if isinstance(npoints, bool) or not isinstance(npoints, (int, np.integer)) or npoints < 2:
        raise BandsError(f"npoints must be an integer >= 2 (k-points on the path), got {npoints!r}")
    return int(npoints)


def special_points(atoms: Atoms) -> dict:
    """ASE's special points (scaled) of the cell, restricted to the periodic directions."""
    _check_periodic(atoms)
    try:
        return dict(atoms.cell.bandpath(npoints=0, pbc=atoms.pbc).special_points)
    except Exception as err:  # ASE's lattice recognition raises several types
        raise BandsError(
            f"no special points for this cell ({type(err).__name__}: {err}); "
            "pass a BandPath with explicit k-points"
        ) from None


def band_path(atoms: Atoms, path=None, npoints: int = DEFAULT_NPOINTS) -> BandPath:
    """A :class:`~ase.dft.kpoints.BandPath` of ``atoms`` from special-point names
    (``"GXMG"``, ``"GXWK,UX"`` with breaks, ``Γ`` for ``G``; None: ASE's standard path
    of the cell), restricted to the periodic directions; a BandPath is checked
    against the cell and returned as is."""
    _check_periodic(atoms)
    if isinstance(path, BandPath):
        return _on_cell(path, atoms)
    npoints = _check_npoints(npoints)
    points = special_points(atoms)
    if path is not None:
        if not isinstance(path, str) or not path.replace(",", "").strip():
            raise BandsError(
                f"path must be special-point names like 'GXMG' (one of {sorted(points)} "
                f"each, ',' for a break), got {path!r}"
            )
        path = path.replace("Γ", "G").replace(" ", "")
        try:
            segments = parse_path_string(path)
        except Exception:  # a malformed string (lower-case letters, digits first ...)
            segments = [[path]]
        unknown = sorted({n for segment in segments for n in segment} - set(points))
        if unknown:
            raise BandsError(
                f"unknown special point(s) {unknown} in path {path!r}; this cell "
                f"(pbc={np.asarray(atoms.pbc).tolist()}) has {sorted(points)}"
            )
        if any(len(segment) < 2 for segment in segments) or len(segments) != path.count(",") + 1:
            raise BandsError(
                f"every piece of a path between breaks (',') needs two special points or "
                f"more, like 'GXM,GR'; got {path!r}"
            )
    bandpath = _ase_bandpath(atoms, path, npoints)
    if _breaks(bandpath) > bandpath.path.count(","):
        # a segment without a point inside: ASE's x axis takes it for a break
        more = next((n for n in range(npoints + 1, 50 * npoints) if _fits(atoms, path, n)), None)
        raise BandsError(
            f"npoints={npoints} is too few for the path {bandpath.path!r}: every segment "
            f"needs a k-point inside it; expected at least {more}"
        )
    return bandpath


def _ase_bandpath(atoms: Atoms, path, npoints: int) -> BandPath:
    """ASE's path for the periodic directions, on the structure's own cell (ASE gives
    1D and 2D paths on a reduced cell; the scaled k-points are the same)."""
    try:
        bp = atoms.cell.bandpath(path, npoints=npoints, pbc=atoms.pbc)
    except Exception as err:
        raise BandsError(f"cannot build the path {path!r}: {type(err).__name__}: {err}") from None
    return _on_cell(bp, atoms)


def _fits(atoms: Atoms, path, npoints: int) -> bool:
    bp = _ase_bandpath(atoms, path, npoints)
    return _breaks(bp) <= bp.path.count(",")


def _on_cell(bp: BandPath, atoms: Atoms) -> BandPath:
    """``bp`` on the cell of ``atoms``: as is, or rebuilt from ASE's reduced cell of
    a 1D or 2D structure; another cell is an error."""
    cell = np.asarray(atoms.cell)
    if np.allclose(np.asarray(bp.cell), cell, atol=1e-6):
        return bp
    reduced = atoms.cell.bandpath(npoints=0, pbc=atoms.pbc).cell if not all(atoms.pbc) else cell
    if not np.allclose(np.asarray(bp.cell), np.asarray(reduced), atol=1e-6):
        raise BandsError(
            f"the BandPath belongs to the cell {np.round(bp.cell[:], 4).tolist()}, "
            f"expected the structure's cell {np.round(cell, 4).tolist()}"
        )
    return BandPath(
        cell=atoms.cell.copy(),
        kpts=np.array(bp.kpts),
        special_points={k: np.array(v) for k, v in bp.special_points.items()},
        path=bp.path,
    )


def _breaks(bp: BandPath) -> int:
    """Number of jumps in ASE's x axis of the path (consecutive k-points at one x)."""
    return len(_cuts(bp))


def _cuts(bp: BandPath) -> list[int]:
    """Indices where a new continuous piece of the path starts."""
    x = bp.get_linear_kpoint_axis()[0]
    kpts = np.asarray(bp.kpts)
    return [
        i + 1
        for i in range(len(x) - 1)
        if x[i + 1] == x[i] and not np.allclose(kpts[i], kpts[i + 1])
    ]


def fermi_grid(
    atoms: Atoms,
    density: float = DEFAULT_FERMI_DENSITY,
    max_kpts: int = DEFAULT_FERMI_MAX_KPTS,
) -> dict:
    """Gamma-centred Monkhorst-Pack grid of ``density`` k-points per 1/Angstrom along
    the periodic directions (1 along the others), lowered to at most ``max_kpts``
    points in all, as a calculator ``kpts`` dict."""
    _check_periodic(atoms)
    if not np.isfinite(density) or density <= 0:
        raise BandsError(f"k-point density must be a positive number, got {density!r}")
    if isinstance(max_kpts, bool) or not isinstance(max_kpts, (int, np.integer)) or max_kpts < 1:
        raise BandsError(f"max_kpts must be a positive integer, got {max_kpts!r}")
    while True:
        size = np.maximum(kptdensity2monkhorstpack(atoms, kptdensity=density, even=False), 1)
        if np.prod(size) <= max_kpts or np.all(size == 1):
            return {"size": tuple(int(n) for n in size), "gamma": True}
        density *= 0.95


def _grid_kpts(atoms: Atoms, fermi_kpts) -> dict:
    """The calculator's ``kpts`` for the Fermi level: None (default density), a size
    ``(n1, n2, n3)`` (Gamma-centred) or a grid dict; 1 along non-periodic directions."""
    if fermi_kpts is None:
        return fermi_grid(atoms)
    if isinstance(fermi_kpts, dict):
        if "path" in fermi_kpts:
            raise BandsError(
                f"fermi_kpts must be a k-grid (a path does not sample the zone), got {fermi_kpts!r}"
            )
        return fermi_kpts
    size = np.asarray(fermi_kpts)
    if (
        size.shape != (3,)
        or size.dtype.kind not in "iu"
        or np.any(size < 1)
        or np.any(size[~np.asarray(atoms.pbc)] != 1)
    ):
        raise BandsError(
            f"fermi_kpts must be three positive integers, 1 along non-periodic directions "
            f"(pbc={np.asarray(atoms.pbc).tolist()}), got {np.asarray(fermi_kpts).tolist()!r}"
        )
    return {"size": tuple(int(n) for n in size), "gamma": True}


# -- the model's bands and GPAW's ------------------------------------------------------
def model_bands(
    atoms: Atoms,
    calc: GearsHCalculator,
    path=None,
    npoints: int = DEFAULT_NPOINTS,
    fermi_kpts=None,
) -> BandStructure:
    """The calculator's bands of ``atoms`` along ``path`` (names or a BandPath, see
    :func:`band_path`), as an ASE :class:`BandStructure` with absolute energies (eV)
    and ``reference`` = the Fermi level from the k-grid ``fermi_kpts`` (None:
    :func:`fermi_grid`; a size ``(n1, n2, n3)``, Gamma-centred; or a grid dict).

    The calculator's ``kpts`` are restored afterwards; its predicted blocks are
    computed once and kept (they do not depend on k)."""
    bandpath = band_path(atoms, path, npoints)
    grid = _grid_kpts(atoms, fermi_kpts)
    old = calc.parameters.get("kpts")
    try:
        calc.set(kpts=grid)
        fermi = float(calc.get_property("fermi_level", atoms))
        calc.set(kpts=bandpath)
        energies = np.asarray(calc.get_property("eigenvalues", atoms), float)
    finally:
        calc.set(kpts=old)
    return BandStructure(bandpath, energies, reference=fermi)


def check_same_structure(
    atoms: Atoms, other: Atoms, what: str, tol: float = STRUCTURE_TOLERANCE
) -> None:
    """Raise :class:`BandsError` unless ``other`` (from ``what``) has the numbers, pbc,
    cell and positions (modulo lattice vectors along periodic directions) of ``atoms``."""
    expected = f"expected {atoms.get_chemical_formula()} ({len(atoms)} atoms) of the structure"
    if len(other) != len(atoms) or np.any(other.numbers != atoms.numbers):
        raise BandsError(
            f"{what} holds another structure: {expected}, got "
            f"{other.get_chemical_formula()} ({len(other)} atoms, or another atom order)"
        )
    if np.any(np.asarray(other.pbc) != np.asarray(atoms.pbc)):
        raise BandsError(
            f"{what} holds another structure: expected pbc={np.asarray(atoms.pbc).tolist()}, "
            f"got {np.asarray(other.pbc).tolist()}"
        )
    dcell = np.abs(np.asarray(other.cell) - np.asarray(atoms.cell)).max()
    if dcell > tol:
        raise BandsError(
            f"{what} holds another structure: cell differs by {dcell:.3g} A (tolerance "
            f"{tol:g} A); expected {np.round(atoms.cell[:], 4).tolist()}, "
            f"got {np.round(other.cell[:], 4).tolist()}"
        )
    d = other.positions - atoms.positions
    if np.any(atoms.pbc) and atoms.cell.rank == 3:
        frac = np.linalg.solve(np.asarray(atoms.cell).T, d.T).T
        frac[:, atoms.pbc] -= np.round(frac[:, atoms.pbc])
        d = frac @ np.asarray(atoms.cell)
    dist = np.linalg.norm(d, axis=1)
    worst = int(np.argmax(dist))
    if dist[worst] > tol:
        raise BandsError(
            f"{what} holds another structure: atom {worst} ({atoms.get_chemical_symbols()[worst]}) "
            f"is {dist[worst]:.3g} A away (tolerance {tol:g} A); expected the same positions"
        )


def _check_gpw_file(gpw) -> Path:
    gpw = Path(gpw)
    if not gpw.is_file():
        raise BandsError(f"reference {str(gpw)!r} not found; expected a GPAW .gpw file")
    return gpw


def check_reference(gpw, atoms: Atoms, tol: float = STRUCTURE_TOLERANCE) -> None:
    """Check that ``gpw`` is a spin-paired GPAW run of the structure ``atoms``."""
    load_reference(gpw, atoms, tol)


def _lcao_orbitals(calc) -> int | None:
    """Number of LCAO orbitals of a GPAW calculator in LCAO mode, else None."""
    try:
        if getattr(calc.params.mode, "name", None) != "lcao":
            return None
        return int(sum(setup.nao for setup in calc.dft.setups))
    except AttributeError:  # another GPAW interface: keep the .gpw's bands
        return None


def load_reference(gpw, atoms: Atoms | None = None, tol: float = STRUCTURE_TOLERANCE):
    """GPAW's calculator of ``gpw``, checked: a readable .gpw of a spin-paired run
    holding the structure ``atoms`` when given (numbers, pbc; cell and positions
    within ``tol`` Angstrom); else :class:`BandsError`."""
    gpw = _check_gpw_file(gpw)
    from gpaw import GPAW

    try:
        calc = GPAW(str(gpw), txt=None)
        gpw_atoms = calc.get_atoms()
        spins = calc.get_number_of_spins()
    except Exception as err:
        raise BandsError(
            f"cannot load {gpw} with GPAW: {type(err).__name__}: {err}; expected a .gpw file"
        ) from None
    if atoms is not None:
        check_same_structure(atoms, gpw_atoms, f"reference {gpw}", tol)
    if spins != 1:
        raise BandsError(
            f"reference {gpw} is spin-polarised (2 spin channels); expected a spin-paired "
            "run like the model's"
        )
    return calc


def reference_bands(
    gpw,
    path_kpts,
    atoms: Atoms | None = None,
    tol: float = STRUCTURE_TOLERANCE,
    nbands="all",
) -> BandStructure:
    """GPAW's bands on the k-points ``path_kpts`` (a BandPath or (n, 3) scaled
    k-points) from the self-consistent density of ``gpw`` (a .gpw path, or the
    calculator of :func:`load_reference`): ``fixed_density`` without symmetry, so
    every k-point is kept in order.  Returns a :class:`BandStructure` (absolute
    energies, eV; ``reference`` = the Fermi level of the .gpw's SCF run).

    ``nbands``: ``"all"`` (an LCAO run: every orbital, like the model; other modes:
    the .gpw's bands), None (the .gpw's bands) or a number for GPAW.  The .gpw must
    hold the structure ``atoms`` when given (numbers, pbc; cell and positions within
    ``tol`` Angstrom), and the cell of ``path_kpts`` when a BandPath; else
    :class:`BandsError`."""
    if isinstance(gpw, (str, Path)):
        calc, where = load_reference(gpw, atoms, tol), f"reference {gpw}"
    else:
        calc, where = gpw, "the reference"
        if atoms is not None:
            check_same_structure(atoms, calc.get_atoms(), where, tol)
    cell = np.asarray(calc.get_atoms().cell)
    if isinstance(path_kpts, BandPath):
        if np.abs(np.asarray(path_kpts.cell) - cell).max() > tol:
            raise BandsError(
                f"{where} holds another cell than the path's: expected "
                f"{np.round(path_kpts.cell[:], 4).tolist()}, got {np.round(cell, 4).tolist()}"
            )
        bandpath = path_kpts
    else:
        kpts = np.asarray(path_kpts, float)
        if kpts.ndim != 2 or kpts.shape[1] != 3 or not len(kpts):
            raise BandsError(
                f"path_kpts must be a BandPath or (n, 3) scaled k-points, got shape {kpts.shape}"
            )
        bandpath = BandPath(cell, kpts=kpts)
    kpts = np.asarray(bandpath.kpts, float)
    fermi = float(calc.get_fermi_level())
    extra = {}
    if nbands == "all":
        nao = _lcao_orbitals(calc)
        if nao is not None:
            extra["nbands"] = nao
    elif nbands is not None:
        extra["nbands"] = nbands
    fd = calc.fixed_density(kpts=kpts, symmetry="off", txt=None, **extra)
    got = np.asarray(fd.get_ibz_k_points(), float)
    if got.shape != kpts.shape or np.abs(got - kpts).max() > 1e-8:
        raise RuntimeError(
            f"GPAW's fixed-density run changed the k-points ({len(got)} for {len(kpts)})"
        )
    energies = np.array([fd.get_eigenvalues(kpt=q, spin=0) for q in range(len(kpts))])
    return BandStructure(bandpath, energies[None], reference=fermi)


# -- analysis --------------------------------------------------------------------------
def band_gap(bs: BandStructure) -> dict:
    """Band gap along the path with respect to ``bs.reference`` (the Fermi level):
    ``gap_eV`` (0 when a band crosses E_F: metallic; None when no band lies on one
    side of E_F), ``direct``, the band edges and their k-points (scaled)."""
    e = np.asarray(bs.energies[0])
    fermi = float(bs.reference)
    kpts = np.asarray(bs.path.kpts)
    below = e <= fermi
    crossing = bool(np.any(below.any(0) & (~below).any(0)))
    if crossing:
        return {"gap_eV": 0.0, "metallic": True}
    if below.all() or not below.any():
        return {"gap_eV": None, "metallic": False}
    ev, ec = np.where(below, e, -np.inf), np.where(below, np.inf, e)
    kv, nv = np.unravel_index(np.argmax(ev), e.shape)
    kc, nc = np.unravel_index(np.argmin(ec), e.shape)
    return {
        "gap_eV": float(e[kc, nc] - e[kv, nv]),
        "metallic": False,
        "direct": bool(np.allclose(kpts[kv], kpts[kc])),
        "vbm_eV": float(e[kv, nv]),
        "cbm_eV": float(e[kc, nc]),
        "vbm_k": kpts[kv].tolist(),
        "cbm_k": kpts[kc].tolist(),
    }


def compare_bands(bs: BandStructure, reference: BandStructure, window: float = MAE_WINDOW) -> dict:
    """Eigenvalue errors of ``bs`` against ``reference`` on the same k-points, band by
    band (the reference's bands only), absolute energies, for reference states within
    ``window`` eV of the reference's Fermi level."""
    e, r = np.asarray(bs.energies[0]), np.asarray(reference.energies[0])
    if e.shape[0] != r.shape[0] or not np.allclose(bs.path.kpts, reference.path.kpts, atol=1e-8):
        raise BandsError(
            f"the reference's k-points differ from the model's ({r.shape[0]} and {e.shape[0]})"
        )
    nb = min(e.shape[1], r.shape[1])
    err = np.abs(e[:, :nb] - r[:, :nb])
    ef = float(reference.reference)
    inside = np.abs(r[:, :nb] - ef) <= window
    return {
        "window_eV": [ef - window, ef + window],
        "bands_compared": int(nb),
        "values_compared": int(inside.sum()),
        "mae_eV": float(err[inside].mean()) if inside.any() else None,
        "max_abs_error_eV": float(err[inside].max()) if inside.any() else None,
        "mae_all_bands_eV": float(err.mean()),
        "fermi_level_difference_eV": float(bs.reference) - ef,
    }


# -- files -----------------------------------------------------------------------------
def write_bands_csv(path, bs: BandStructure, reference: BandStructure | None = None) -> None:
    """``k,x,kx,ky,kz,band,energy_eV[,gpaw_energy_eV]`` (absolute energies; k scaled;
    x in 1/Angstrom), written atomically."""
    x = bs.path.get_linear_kpoint_axis()[0]
    kpts = np.asarray(bs.path.kpts)
    e = np.asarray(bs.energies[0])
    header = "k,x,kx,ky,kz,band,energy_eV"
    r = None
    if reference is not None:
        header += ",gpaw_energy_eV"
        r = np.asarray(reference.energies[0])
    rows = [header]
    for q in range(len(kpts)):
        head = f"{q},{x[q]:.8f},{kpts[q][0]:.8f},{kpts[q][1]:.8f},{kpts[q][2]:.8f}"
        for n in range(e.shape[1]):
            row = f"{head},{n},{e[q, n]:.8f}"
            if r is not None:
                row += f",{r[q, n]:.8f}" if n < r.shape[1] else ","
            rows.append(row)
    atomic_write_text(path, "\n".join(rows) + "\n")


def _segments(bs: BandStructure):
    """Index ranges of the continuous pieces of the path (split at breaks 'K,U')."""
    x = bs.path.get_linear_kpoint_axis()[0]
    edges = [0, *_cuts(bs.path), len(x)]
    return x, [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _tick_labels(bs: BandStructure):
    """(positions, labels) of the special points; 'G' as Γ, 'K|U' at a break."""
    _, xs, labels = bs.path.get_linear_kpoint_axis()
    ticks: list[float] = []
    names: list[str] = []
    for xx, name in zip(xs, labels):
        name = "Γ" if name == "G" else name
        if ticks and abs(xx - ticks[-1]) < 1e-9:
            if names[-1] != name:
                names[-1] += "|" + name
            continue
        ticks.append(float(xx))
        names.append(name)
    return ticks, names


def plot_bands(
    path_png,
    bs: BandStructure,
    reference: BandStructure | None = None,
    emin: float = -MAE_WINDOW,
    emax: float = MAE_WINDOW,
    title: str = "",
    figsize=(6.0, 4.5),
    dpi: int = 120,
) -> None:
    """Bands against E - E_F (``bs.reference``) between ``emin`` and ``emax`` eV, with
    the special points; ``reference`` (GPAW) dashed on top, shifted by the same
    E_F (so differences are absolute errors), its own Fermi level dotted.  PNG
    written atomically, without pyplot."""
    if not emin < emax:
        raise BandsError(f"the energy window needs emin < emax, got {emin!r} and {emax!r}")
    fig, ax = new_figure(figsize=figsize)
    fermi = float(bs.reference)
    x, pieces = _segments(bs)
    sets = [(bs, dict(color="C0", lw=2.0, ls="-"), "model")]
    if reference is not None:
        sets.append((reference, dict(color="C3", lw=1.0, ls=(0, (4, 2))), "GPAW"))
    for which, style, label in sets:
        e = np.asarray(which.energies[0]) - fermi
        for i, piece in enumerate(pieces):
            lines = ax.plot(x[piece], e[piece], **style)
            if i == 0:
                lines[0].set_label(label)
    ticks, names = _tick_labels(bs)
    for t in ticks[1:-1]:
        ax.axvline(t, color="0.6", lw=0.8)
    ax.axhline(0.0, color="k", lw=0.8, ls=":", label="E_F (model)")
    shift = None if reference is None else float(reference.reference) - fermi
    if shift is not None and abs(shift) > 0.01 * (emax - emin) and emin < shift < emax:
        ax.axhline(shift, color="C3", lw=0.8, ls=":", label="E_F (GPAW)")
    ax.set_xticks(ticks, names)
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(emin, emax)
    ax.set_ylabel("E - E_F (eV)")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=True, fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    save_figure(fig, path_png, dpi=dpi)


# -- the command -----------------------------------------------------------------------
def _k_text(size) -> str:
    return "x".join(str(int(n)) for n in size)


def bands_structure(
    structure,
    model,
    output,
    path=None,
    npoints: int = DEFAULT_NPOINTS,
    reference=None,
    overwrite: bool = False,
    index=-1,
    fermi_kpts=None,
    emin: float = -MAE_WINDOW,
    emax: float = MAE_WINDOW,
    progress: bool = True,
    log=print,
) -> dict:
    """Band structure of one structure file (or Atoms) along ``path``, written to the
    folder ``output`` (``bands.csv``, ``bands.json``, ``bands.png``; an existing
    folder is replaced only with ``overwrite``); returns the summary.

    ``model``: a checkpoint path, a loaded Model, or a :class:`GearsHCalculator`
    (used as is).  ``reference``: a GPAW .gpw of the same structure, whose bands
    are computed on the same k-points and compared.  ``emin``/``emax``: the plot's
    window, eV relative to E_F."""
    out = check_output_folder(output, overwrite)
    npoints = _check_npoints(npoints)
    for name, value in (("emin", emin), ("emax", emax)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise BandsError(f"{name} must be a number (eV relative to E_F), got {value!r}")
    if not emin < emax:
        raise BandsError(f"the energy window needs emin < emax, got {emin!r} and {emax!r}")
    atoms, name = _read_structure(structure, index)
    _check_periodic(atoms, name)
    bandpath = band_path(atoms, path, npoints)
    grid = _grid_kpts(atoms, fermi_kpts)
    ref_calc = None if reference is None else load_reference(reference, atoms)
    calc = model if isinstance(model, GearsHCalculator) else GearsHCalculator(model)
    if not isinstance(model, GearsHCalculator):
        calc.set(progress=progress)
    atoms.calc = calc
    n_orbitals = calc.get_number_of_bands()  # also checks the elements against the model
    if n_orbitals > calc.parameters.dense_limit:
        raise BandsError(
            f"band structures need dense diagonalisation: {n_orbitals} orbitals exceed "
            f"dense_limit={calc.parameters.dense_limit}; expected a smaller (primitive) cell"
        )
    old = calc.parameters.get("kpts")
    try:
        for kpts in (grid, bandpath):  # checks the k-points against pbc before any work
            calc.set(kpts=kpts)
            calc.get_ibz_k_points()
    finally:
        calc.set(kpts=old)
    with output_folder(out, overwrite, what="output folder (-o)") as tmp:
        summary, lines = _bands_into(
            tmp, atoms, name, calc, bandpath, grid, reference, ref_calc, emin, emax
        )
    for line in lines:
        log(line)
    log(f"wrote {out}/: bands.csv bands.json bands.png")
    return summary


def _gap_text(gap: dict) -> str:
    if gap["gap_eV"] is None:
        return "gap: n/a"
    if gap["metallic"]:
        return "metallic (a band crosses E_F)"
    return f"gap {gap['gap_eV']:.3f} eV ({'direct' if gap['direct'] else 'indirect'})"


def _bands_into(out, atoms, name, calc, bandpath, grid, reference, ref_calc, emin, emax):
    """Compute the bands (and the reference's) and write the files into ``out``."""
    t0 = time.perf_counter()
    bs = model_bands(atoms, calc, bandpath, fermi_kpts=grid)
    old = calc.parameters.get("kpts")
    try:
        calc.set(kpts=grid)
        n_grid = len(calc.get_ibz_k_points())
    finally:
        calc.set(kpts=old)
    t1 = time.perf_counter()
    reliability, reliability_line = reliability_summary(calc)
    ref = None if ref_calc is None else reference_bands(ref_calc, bandpath)
    t2 = time.perf_counter()
    gap = band_gap(bs)
    path_text = bandpath.path
    summary = {
        "structure": name,
        "atoms": len(atoms),
        "pbc": np.asarray(atoms.pbc).tolist(),
        "path": path_text,
        "special_points": {k: np.asarray(v).tolist() for k, v in bandpath.special_points.items()},
        "n_kpts": len(bandpath.kpts),
        "n_bands": int(bs.energies.shape[2]),
        "fermi_level_eV": float(bs.reference),
        "fermi_kpts": {"size": list(grid.get("size", [])), "gamma": grid.get("gamma", False)}
        if "size" in grid
        else grid,
        "fermi_kpts_ibz": n_grid,
        "band_gap": gap,
        "reference": None,
        "reliability": None if reliability is None else reliability["figure"],
        "reliability_detail": reliability,
        "plot_window_eV": [emin, emax],
        "units": {
            "energy": "eV (absolute; E - E_F in the plot)",
            "k": "scaled (fractional) reciprocal coordinates",
            "x": "path coordinate, 1/Angstrom (2 pi included)",
        },
        "timings_s": {"model": t1 - t0, "reference": t2 - t1},
        "model": str(getattr(calc.model, "path", "") or ""),
    }
    if ref is not None:
        summary["reference"] = {
            "gpw": str(reference),
            "fermi_level_eV": float(ref.reference),
            "n_bands": int(ref.energies.shape[2]),
            "band_gap": band_gap(ref),
            **compare_bands(bs, ref),
        }
    write_bands_csv(out / "bands.csv", bs, ref)
    atomic_write_text(out / "bands.json", json.dumps(summary, indent=1) + "\n")
    plot_bands(
        out / "bands.png",
        bs,
        ref,
        emin,
        emax,
        title=f"{name} along {path_text.replace('G', 'Γ')}"
        + (f": model (solid), GPAW {Path(reference).name} (dashed)" if ref is not None else ""),
    )
    size = grid.get("size")
    lines = [
        f"{name}: path {path_text}, {len(bandpath.kpts)} k-points, {bs.energies.shape[2]} bands; "
        f"E_F = {bs.reference:.4f} eV (k-grid "
        f"{_k_text(size) if size is not None else grid}, {n_grid} k-points); {_gap_text(gap)}",
        reliability_line,
    ]
    if ref is not None:
        c = summary["reference"]
        mae = "n/a" if c["mae_eV"] is None else f"{1000 * c['mae_eV']:.2f} meV"
        worst = "n/a" if c["max_abs_error_eV"] is None else f"{1000 * c['max_abs_error_eV']:.2f}"
        lines.append(
            f"against GPAW ({Path(reference).name}): eigenvalue MAE {mae} within E_F -+ "
            f"{MAE_WINDOW:g} eV (largest {worst} meV, {c['bands_compared']} bands); "
            f"E_F(GPAW) = {ref.reference:.4f} eV, {_gap_text(c['band_gap'])}"
        )
    return summary, lines


def _parse_grid(text):
    """'12,12,1' or '12x12x1' -> (12, 12, 1) for --fermi-kpts; None stays None."""
    if text is None:
        return None
    try:
        size = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise BandsError(f"--fermi-kpts expects three positive integers like 12,12,1, got {text!r}")
    return size


def _bands_command(args) -> None:
    bands_structure(
        args.structure,
        args.model,
        args.output,
        path=args.path,
        npoints=args.npoints,
        reference=args.reference,
        overwrite=args.overwrite,
        index=args.index,
        fermi_kpts=_parse_grid(args.fermi_kpts),
        emin=args.emin,
        emax=args.emax,
        progress=not args.quiet,
    )


def register(subparsers):
    """Add ``gearsh bands`` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "bands",
        help="band structure along a path of special points (optionally against GPAW)",
    )
    p.add_argument("structure", help="any file ase.io.read understands (periodic)")
    p.add_argument("-m", "--model", required=True, help="model.ckpt")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    p.add_argument(
        "--path",
        help="special points, e.g. GXMG, GMKG or GXWK,UX (',' = break; default: ASE's "
        "standard path of the cell)",
    )
    p.add_argument(
        "--npoints", type=int, default=DEFAULT_NPOINTS, help=f"k-points ({DEFAULT_NPOINTS})"
    )
    p.add_argument(
        "--reference",
        metavar="RUN.gpw",
        help="GPAW run of the same structure: its bands on the same k-points, compared",
    )
    p.add_argument(
        "--fermi-kpts",
        help=f"Gamma-centred k-grid for E_F, e.g. 12,12,1 (default: {DEFAULT_FERMI_DENSITY:g} "
        f"points per 1/A along the periodic directions, at most {DEFAULT_FERMI_MAX_KPTS} in all)",
    )
    p.add_argument("--emin", type=float, default=-MAE_WINDOW, help="plot from E_F + EMIN (-5)")
    p.add_argument("--emax", type=float, default=MAE_WINDOW, help="plot to E_F + EMAX (5)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the output folder if it exists"
    )
    p.add_argument("--index", default=-1, help="frame of a multi-frame file (default last)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_bands_command)
    return p
