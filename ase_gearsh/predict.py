"""``gearsh predict STRUCTURE -m model.ckpt -o OUT/``: H, S, spectrum, DOS and a plot.

Writes the output folder as a unit (built under a temporary name beside it and
renamed when complete: a failed or killed run leaves no folder, or the old one
untouched; an existing folder is replaced only with ``overwrite``; a second run
writing the same folder at the same time is refused).  Everything is checked
(output path, DOS options, structure, k-points against the periodic directions)
before the model is run.  Contents (units recorded in ``summary.json``):

* ``hamiltonian.npz``, ``overlap.npz``: Gamma-point H (eV) and S, compressed
  scipy.sparse CSR (``scipy.sparse.load_npz``), GPAW orbital order;
* ``blocks.npz``: the real-space blocks (on-site and pair blocks with lattice
  shifts, as in datasets), from which H(k) follows at any k;
* ``eigenvalues.csv`` (dense solver only): k-point, weight, band, energy;
* ``dos.csv`` and ``dos.png``: total and species-projected DOS with E_F;
* ``summary.json``: sizes, Fermi level, timings, model and options, and the
  reliability figure (``reliability``: 1 ~ the edge of the training set's atom
  environments, larger = extrapolating; ``null`` when the model stores no reference
  or an element has none) with the worst atoms (``reliability_detail``).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from ase import Atoms
from ase.io import read

from .calculator import GearsHCalculator
from .core.errors import GearsHError
from .core.io import atomic_write_bytes, check_output_folder, new_figure, output_folder, save_figure
from .electronic.spectrum import check_dos_args
from .model.reliability import missing_species, reference_of

__all__ = ["predict_structure", "PredictError"]


class PredictError(GearsHError, ValueError):
    """Unreadable structure or unusable options."""


def _write_npz_sparse(path: Path, mat) -> None:
    buf = io.BytesIO()
    sp.save_npz(buf, mat.tocsr(), compressed=True)
    atomic_write_bytes(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def parse_kpts(text):
    """'4,4,1' or '4x4x1' -> Gamma-centred grid dict; None stays None."""
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise PredictError(f"--kpts expects three integers like 4,4,1, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise PredictError(f"--kpts expects three positive integers like 4,4,1, got {text!r}")
    return {"size": size, "gamma": True}


def _finite(x) -> float | None:
    """JSON has no inf: non-finite figures become null."""
    return float(x) if np.isfinite(x) else None


def reliability_summary(calc: GearsHCalculator, worst: int = 5) -> tuple[dict | None, str]:
    """(JSON-ready detail, one log line) of the calculator's reliability figure."""
    figure = calc.get_reliability()
    if figure is None:
        return None, (
            "reliability: none (the model stores no reference; "
            "`gearsh attach-reliability MODEL DATASET` adds one)"
        )
    scores = calc.get_reliability(per_atom=True)
    symbols = calc.atoms.get_chemical_symbols()
    order = np.argsort(-scores, kind="stable")[:worst]
    threshold = calc.parameters.reliability_threshold
    detail = {
        "figure": _finite(figure),
        "threshold": threshold,
        "worst_atoms": [
            {"index": int(i), "symbol": symbols[i], "score": _finite(scores[i])} for i in order
        ],
        "missing_species": missing_species(reference_of(calc.model), symbols),
    }
    worst_text = ", ".join(f"{int(i)} {symbols[i]} {scores[i]:.2f}" for i in order)
    verdict = (
        "extrapolating: do not trust without a check"
        if threshold is not None and figure > threshold
        else "within the training data"
        if figure <= 1.0
        else "near the edge of the training data"
    )
    warns = "" if threshold is None else f", warning above {threshold:g}"
    line = (
        f"reliability figure {figure:.2f} ({verdict}; 1 ~ edge of the training data"
        f"{warns}); worst atoms: {worst_text}"
    )
    for sym, why in detail["missing_species"].items():
        line += f"; {sym}: {why}"
    return detail, line


def plot_dos(path: Path, energies, dos, pdos: dict, fermi: float, title: str = "") -> None:
    """Total and projected DOS against E - E_F, written atomically as a PNG (no pyplot,
    no process-wide matplotlib state)."""
    fig, ax = new_figure(figsize=(7, 4))
    x = energies - fermi
    ax.plot(x, dos, color="k", lw=1.2, label="total")
    for name, y in pdos.items():
        ax.plot(x, y, lw=1.0, label=name)
    ax.axvline(0.0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("E - E_F (eV)")
    ax.set_ylabel("DOS (states/eV, per spin)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def predict_structure(
    structure,
    model,
    output,
    kpts=None,
    width: float = 0.1,
    npts: int = 2001,
    emin=None,
    emax=None,
    method: str = "auto",
    charge: float = 0.0,
    index=-1,
    progress: bool = True,
    log=print,
    overwrite: bool = False,
) -> dict:
    """Run the calculator on one structure file (or Atoms) and write ``output``
    (a new folder; an existing one is replaced only with ``overwrite``)."""
    out = check_output_folder(output, overwrite)
    try:
        check_dos_args(width, npts, emin, emax, method)
    except ValueError as err:
        raise PredictError(str(err)) from None
    atoms, name = _read_structure(structure, index)
    with output_folder(out, overwrite, what="output folder (-o)") as tmp:
        summary, lines = _predict_into(
            tmp, atoms, name, model, kpts, width, npts, emin, emax, method, charge, progress
        )
    for line in lines:
        log(line)
    log(
        f"wrote {out}/: hamiltonian.npz overlap.npz blocks.npz "
        f"{'eigenvalues.csv ' if summary['method'] == 'dense' else ''}"
        "dos.csv dos.png summary.json"
    )
    return summary


def _read_structure(structure, index) -> tuple[Atoms, str]:
    if isinstance(structure, Atoms):
        return structure.copy(), structure.get_chemical_formula()
    path = Path(structure)
    if not path.is_file():
        raise PredictError(f"structure file {str(path)!r} not found")
    try:
        atoms = read(path, index=index)
    except (StopIteration, IndexError):
        raise PredictError(f"{path}: --index {index!r} selects no frame of the file") from None
    except Exception as err:  # ase.io raises many types on bad files
        raise PredictError(
            f"cannot read {path} with ase.io.read: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(atoms, Atoms):
        raise PredictError(
            f"{path}: --index {index!r} selects {len(atoms)} frames; expected one frame"
        )
    return atoms, path.name


def _predict_into(out, atoms, name, model, kpts, width, npts, emin, emax, method, charge, progress):
    """Compute everything and write it into the folder ``out``; (summary, log lines)."""
    t0 = time.perf_counter()
    calc = GearsHCalculator(model, kpts=kpts, charge=charge, progress=progress)
    t_load = time.perf_counter()
    atoms.calc = calc
    # cheap checks first: atoms, k-points against pbc, elements, solver
    calc.get_ibz_k_points()
    use_kpm = calc.uses_kpm(method)
    if use_kpm and len(calc.get_ibz_k_points()) > 1:
        raise PredictError(
            "the kernel polynomial method (used above dense_limit orbitals) works at "
            f"Gamma only; got --kpts {kpts['size'] if isinstance(kpts, dict) else kpts}"
        )
    t1 = time.perf_counter()
    H = calc.get_hamiltonian()
    t2 = time.perf_counter()
    S = calc.get_overlap()
    t3 = time.perf_counter()
    _write_npz_sparse(out / "hamiltonian.npz", H)
    _write_npz_sparse(out / "overlap.npz", S)
    pb = calc.blocks()
    onsite, pairs = pb.flat()
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        orbital_counts=pb.orbital_counts,
        pair_ij=np.column_stack([pb.pair_i, pb.pair_j]),
        pair_shift=pb.pair_shift,
        onsite_H=onsite,
        pair_H=pairs,
        numbers=atoms.numbers,
        positions=atoms.positions,
        cell=np.asarray(atoms.cell),
        pbc=atoms.pbc,
        units=np.array("eV"),
    )
    atomic_write_bytes(out / "blocks.npz", buf.getvalue())
    e, dos = calc.get_dos(width=width, npts=npts, emin=emin, emax=emax, method=method)
    e, pdos = calc.get_pdos(width=width, npts=npts, emin=emin, emax=emax, method=method)
    ef = calc.get_fermi_level()
    t4 = time.perf_counter()
    reliability, reliability_line = reliability_summary(calc)
    if not use_kpm:
        k, w = calc.get_ibz_k_points(), calc.get_k_point_weights()
        rows = ["kpt,kx,ky,kz,weight,band,energy_eV"]
        for q in range(len(k)):
            for n, x in enumerate(calc.get_eigenvalues(kpt=q)):
                rows.append(f"{q},{k[q][0]:.8f},{k[q][1]:.8f},{k[q][2]:.8f},{w[q]:.8f},{n},{x:.8f}")
        _write_text(out / "eigenvalues.csv", "\n".join(rows) + "\n")
    names = list(pdos)
    table = np.column_stack([e, dos] + [pdos[s] for s in names])
    header = ",".join(["energy_eV", "total"] + names)
    sio = io.StringIO()
    np.savetxt(sio, table, delimiter=",", header=header, comments="", fmt="%.8g")
    _write_text(out / "dos.csv", sio.getvalue())
    plot_dos(
        out / "dos.png",
        e,
        dos,
        pdos,
        ef,
        title=f"{name}: {len(atoms)} atoms, {H.shape[0]} orbitals"
        f" ({'KPM' if use_kpm else 'dense'})",
    )
    summary = {
        "structure": name,
        "atoms": len(atoms),
        "orbitals": int(H.shape[0]),
        "bonds": int(len(pb.pair_i)),
        "fermi_level_eV": ef,
        "method": "kpm" if use_kpm else "dense",
        "kpts": calc.get_ibz_k_points().tolist(),
        "kpt_weights": calc.get_k_point_weights().tolist(),
        "n_electrons": calc.get_number_of_electrons(),
        "width_eV": width,
        "reliability": None if reliability is None else reliability["figure"],
        "reliability_detail": reliability,
        "units": {"energy": "eV", "length": "Angstrom", "dos": "states/eV per spin"},
        "timings_s": {
            "load_model": t_load - t0,
            "hamiltonian": t2 - t1,
            "overlap": t3 - t2,
            "spectrum": t4 - t3,
            **{k: v for k, v in pb.timings.items() if isinstance(v, float)},
        },
        "model": str(getattr(calc.model, "path", "")),
    }
    _write_text(out / "summary.json", json.dumps(summary, indent=1))
    lines = [
        f"{name}: {len(atoms)} atoms, {H.shape[0]} orbitals, {len(pb.pair_i)} bonds; "
        f"E_F = {ef:.4f} eV; H in {t2 - t1:.2f} s, S in {t3 - t2:.2f} s, spectrum in "
        f"{t4 - t3:.2f} s ({summary['method']})",
        reliability_line,
    ]
    return summary, lines
