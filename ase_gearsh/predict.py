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
  or an element has none) with the worst atoms (``reliability_detail``), and
  (dense solver) ``near_null_levels``: the most occupied levels at one k-point along
  S's near-null directions, spurious levels of a predicted H (a warning when > 0;
  ``GearsHCalculator.get_near_null_levels``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from ase import Atoms
from ase.io import read

from .calculator import GearsHCalculator
from .core.errors import GearsHError
from .core.io import atomic_write_bytes, check_output_folder, new_figure, output_folder, save_figure
from .electronic.kpm import kpm_fermi_window_count, kpm_window_count
from .electronic.spectrum import KPMOptions, check_dos_args
from .model.reliability import missing_species, reference_of

__all__ = ["predict_structure", "predict_many", "hole_count", "exact_hole_count", "PredictError"]


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
    holes=None,
    hole_window: float = 0.2,
    fermi_guess: float | None = None,
    overlap_screen: float | None = None,
    overlap_cutoff: float | None = None,
    pdos: str = "species",
    resolution_at: str | None = None,
) -> dict:
    """Run the calculator on one structure file (or Atoms) and write ``output``
    (a new folder; an existing one is replaced only with ``overwrite``).
    ``overlap_screen``, ``overlap_cutoff``: the calculator's parameters (None: their
    defaults).

    ``holes``: element symbols (e.g. ``["W", "Se"]``) whose projected DOS is
    integrated from E_F to E_F + ``hole_window`` eV: the hole count (both spins) and,
    for a cell periodic in a and b, the areal concentration in cm^-2, as in the GEARS H
    paper's WSe2-on-HfO2 study.  ``pdos``: ``'species'`` (every species' PDOS in
    ``dos.csv``) or ``'holes'`` (the ``holes`` elements as one row, e.g. ``W+Se``: with
    KPM one group, two moments per Chebyshev step, the faster route at device scale).
    ``resolution_at``: the KPM option (``'interval'``, default: ``width`` everywhere;
    ``'fermi'``: ``width`` near E_F, where the hole count is read, with fewer moments)."""
    out = check_output_folder(output, overwrite)
    if resolution_at not in (None, "interval", "fermi"):
        raise PredictError(f"--resolution-at must be 'interval' or 'fermi', got {resolution_at!r}")
    _check_method_args(width, npts, emin, emax, method)
    holes = _check_holes(holes, hole_window)
    _check_pdos(pdos, holes)
    _check_guess(fermi_guess)
    atoms, name = _read_structure(structure, index)
    missing = sorted(set(holes or []) - set(atoms.get_chemical_symbols()))
    if missing:
        raise PredictError(
            f"--holes {','.join(holes)}: {name} has no {', '.join(missing)} atoms; "
            f"its elements are {', '.join(sorted(set(atoms.get_chemical_symbols())))}"
        )
    with output_folder(out, overwrite, what="output folder (-o)") as tmp:
        summary, lines = _predict_into(
            tmp,
            atoms,
            name,
            model,
            kpts,
            width,
            npts,
            emin,
            emax,
            method,
            charge,
            progress,
            holes,
            hole_window,
            fermi_guess,
            overlap_screen,
            overlap_cutoff,
            pdos,
            resolution_at,
        )
    for line in lines:
        log(line)
    extra = {"dense": "eigenvalues.csv ", "exact": "states.csv "}.get(summary["method"], "")
    log(f"wrote {out}/: hamiltonian.npz overlap.npz blocks.npz {extra}dos.csv dos.png summary.json")
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


def _check_method_args(width, npts, emin, emax, method) -> None:
    """The DOS arguments and ``method``: 'auto', 'dense', 'kpm' or 'exact'."""
    try:
        check_dos_args(width, npts, emin, emax, "auto" if method == "exact" else method)
    except ValueError as err:
        msg = str(err)
        if "method must be" in msg:
            msg = f"method must be 'auto', 'dense', 'kpm' or 'exact', got {method!r}"
        raise PredictError(msg) from None


def _check_guess(guess) -> None:
    if guess is None:
        return
    if isinstance(guess, bool) or not isinstance(guess, (int, float)) or not math.isfinite(guess):
        raise PredictError(f"--fermi-guess must be a finite energy in eV, got {guess!r}")


def _check_pdos(pdos, holes) -> None:
    if pdos not in ("species", "holes") or (pdos == "holes" and not holes):
        raise PredictError(
            f"--pdos must be 'species' or 'holes' (with --holes); got {pdos!r}"
            + ("" if holes else " without --holes")
        )


def _check_holes(holes, window) -> list[str] | None:
    if holes is None:
        return None
    if isinstance(holes, str):
        holes = [h for h in holes.split(",") if h]
    from ase.data import atomic_numbers

    unknown = [h for h in holes if h not in atomic_numbers]
    if not holes or unknown:
        raise PredictError(
            f"--holes expects element symbols like W,Se, got {','.join(holes) or repr('')}"
        )
    if not (isinstance(window, (int, float)) and np.isfinite(window) and window > 0):
        raise PredictError(f"--hole-window must be a finite number of eV > 0, got {window!r}")
    return list(holes)


def hole_count(energies, pdos: dict, fermi: float, species, window: float) -> float:
    """States (both spins) of ``species`` in [E_F, E_F + window] from the per-spin
    species-projected DOS on the grid ``energies``."""
    e = np.asarray(energies)
    if e[0] > fermi or e[-1] < fermi + window:
        raise PredictError(
            f"the DOS grid ({e[0]:.2f}, {e[-1]:.2f}) eV does not cover E_F to E_F + "
            f"{window:g} eV ({fermi:.2f} to {fermi + window:.2f}); widen --emin/--emax"
        )
    fine = np.linspace(fermi, fermi + window, 401)
    total = sum(np.interp(fine, e, pdos[s]) for s in species)
    return float(2.0 * np.trapezoid(total, fine))


def exact_hole_count(info: dict, fermi: float, species, window: float) -> float:
    """States (both spins) of ``species`` in [E_F, E_F + window]: the sum of the exact
    states' Mulliken weights on those species (no broadening)."""
    e = info["energies"]
    sel = (e >= fermi) & (e <= fermi + window)
    return float(2.0 * sum(info["weights"][s][sel].sum() for s in species))


def _exact_spectrum(calc, width, npts, emin, emax, hole_window, fermi_guess=None):
    """E_F, the exact states in [emin, emax] (default E_F -+ 2 eV, widened to hold the
    hole window) and the DOS/PDOS they give, broadened by ``width`` (a local DOS: states
    outside the window are not included)."""
    fs = calc.exact_fermi(guess=fermi_guess)
    ef = fs.fermi_level
    lo = ef - 2.0 if emin is None else float(emin)
    hi = ef + max(2.0, hole_window) if emax is None else float(emax)
    if hole_window and not lo <= ef < ef + hole_window <= hi:
        raise PredictError(
            f"the window [{lo:.3f}, {hi:.3f}] eV does not cover E_F to E_F + "
            f"{hole_window:g} eV ({ef:.3f} to {ef + hole_window:.3f}); widen --emin/--emax"
        )
    eps, weights = calc.get_window_states(lo, hi)
    e = np.linspace(lo, hi, int(npts))
    g = np.exp(-0.5 * ((e[None, :] - eps[:, None]) / width) ** 2) / (np.sqrt(2 * np.pi) * width)
    pdos = {s: w @ g for s, w in weights.items()}
    dos = g.sum(axis=0)
    info = {
        "energies": eps,
        "weights": weights,
        "window_eV": [lo, hi],
        "states_in_window": int(len(eps)),
        "homo_eV": fs.homo,
        "lumo_eV": fs.lumo,
        "gap": float(max(0.0, fs.lumo - fs.homo)) if fs.homo < ef < fs.lumo else 0.0,
        "shifts_tried": [[float(s), int(c)] for s, c in fs.factorisations],
    }
    return e, dos, pdos, ef, info


def _areal_density(atoms, count: float) -> float | None:
    """count per cm^2 of the a-b plane when a and b are periodic (else None)."""
    if not (atoms.pbc[0] and atoms.pbc[1]):
        return None
    area = np.linalg.norm(np.cross(atoms.cell[0], atoms.cell[1]))  # A^2
    return float(count / (area * 1e-16)) if area > 0 else None


def _gap(calc, use_kpm: bool) -> float | None:
    """Band gap (eV) from the dense eigenvalues at the calculator's k-points (0 for a
    metal); None with KPM."""
    if use_kpm:
        return None
    ef = calc.get_fermi_level()
    eps = np.concatenate([calc.get_eigenvalues(kpt=q) for q in range(len(calc.get_ibz_k_points()))])
    below, above = eps[eps <= ef], eps[eps > ef]
    if not len(below) or not len(above):
        return None
    return float(max(0.0, above.min() - below.max()))


def _predict_into(
    out,
    atoms,
    name,
    model,
    kpts,
    width,
    npts,
    emin,
    emax,
    method,
    charge,
    progress,
    holes=None,
    hole_window=0.2,
    fermi_guess=None,
    overlap_screen=None,
    overlap_cutoff=None,
    projection="species",
    resolution_at=None,
):
    """Compute everything and write it into the folder ``out``; (summary, log lines)."""
    t0 = time.perf_counter()
    extra = {} if overlap_screen is None else {"overlap_screen": overlap_screen}
    if overlap_cutoff is not None:
        extra["overlap_cutoff"] = overlap_cutoff
    if resolution_at is not None:
        extra["kpm"] = {"resolution_at": resolution_at}
    calc = GearsHCalculator(model, kpts=kpts, charge=charge, progress=progress, **extra)
    t_load = time.perf_counter()
    atoms.calc = calc
    # cheap checks first: atoms, k-points against pbc, elements, solver
    calc.get_ibz_k_points()
    exact = method == "exact"
    if exact and len(calc.get_ibz_k_points()) > 1:
        raise PredictError(
            "--method exact (exact states near E_F) works at Gamma only; got --kpts "
            f"{kpts['size'] if isinstance(kpts, dict) else kpts}"
        )
    use_kpm = not exact and calc.uses_kpm(method)
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
    exact_info = None
    by = list(holes) if projection == "holes" and not exact else "species"  # dos.csv rows
    if exact:
        e, dos, pdos, ef, exact_info = _exact_spectrum(
            calc, width, npts, emin, emax, hole_window if holes else 0.0, fermi_guess
        )
        rows = ["energy_eV," + ",".join(exact_info["weights"])]
        for i, x in enumerate(exact_info["energies"]):
            rows.append(
                f"{x:.8f}," + ",".join(f"{w[i]:.6f}" for w in exact_info["weights"].values())
            )
        _write_text(out / "states.csv", "\n".join(rows) + "\n")
    else:
        # the projection first: with KPM its moments serve the total DOS too
        e, pdos = calc.get_pdos(width=width, npts=npts, emin=emin, emax=emax, method=method, by=by)
        e, dos = calc.get_dos(width=width, npts=npts, emin=emin, emax=emax, method=method)
        ef = calc.get_fermi_level()
    t4 = time.perf_counter()
    reliability, reliability_line = reliability_summary(calc)
    if not use_kpm and not exact:
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
        f" ({'exact states' if exact else 'KPM' if use_kpm else 'dense'})",
    )
    gap = exact_info["gap"] if exact else _gap(calc, use_kpm)
    # occupied levels along S's near-null directions (dense: from the PDOS's eigenvectors)
    near_null = None if exact or use_kpm else int(calc.get_near_null_levels().max())
    hole_info = None
    if holes:
        stderr = None  # the stochastic error of KPM's count (exact and dense have none)
        rows = holes if by == "species" else list(pdos)  # PDOS rows: the elements or 'W+Se'
        if exact:
            count = exact_hole_count(exact_info, ef, holes, hole_window)
        elif use_kpm:  # the moments behind the PDOS, integrated exactly
            moments = calc.kpm_moments(width, by)
            if calc.uses_kpm():  # E_F from KPM too: a jackknife error with E_F's in it
                fermi_width = KPMOptions.from_parameter(calc.parameters.kpm).fermi_width
                count, stderr, _ = kpm_fermi_window_count(
                    moments,
                    calc.get_number_of_electrons(),
                    hole_window,
                    rows,
                    calc.kpm_moments(fermi_width, None),
                )
            else:  # E_F from dense eigenvalues (up to dense_limit orbitals): exact
                count, stderr = kpm_window_count(moments, ef, ef + hole_window, rows)
            count, stderr = 2.0 * count, None if stderr is None else 2.0 * stderr
        else:
            count = hole_count(e, pdos, ef, rows, hole_window)
        hole_info = {
            "species": holes,
            "window_eV": hole_window,
            "holes": count,
            "holes_stderr": stderr,
            "per_cm2": _areal_density(atoms, count),
        }
    summary = {
        "structure": name,
        "gap_eV": gap,
        "holes": hole_info,
        "atoms": len(atoms),
        "orbitals": int(H.shape[0]),
        "bonds": int(len(pb.pair_i)),
        "fermi_level_eV": ef,
        "method": "exact" if exact else "kpm" if use_kpm else "dense",
        "exact_states": None
        if exact_info is None
        else {k: v for k, v in exact_info.items() if k not in ("energies", "weights")},
        "kpts": calc.get_ibz_k_points().tolist(),
        "kpt_weights": calc.get_k_point_weights().tolist(),
        "n_electrons": calc.get_number_of_electrons(),
        "width_eV": width,
        "pdos_rows": list(pdos),
        "overlap_screen": calc.parameters.overlap_screen,
        "overlap_cutoff": calc.parameters.overlap_cutoff,
        "kpm": None
        if not use_kpm
        else {
            "moments": int(calc.kpm_moments(width, None).moments.shape[1]),
            "random_vectors": int(KPMOptions.from_parameter(calc.parameters.kpm).n_random),
            "resolution_at": KPMOptions.from_parameter(calc.parameters.kpm).resolution_at,
        },
        "near_null_levels": near_null,
        "reliability": None if reliability is None else reliability["figure"],
        "reliability_detail": reliability,
        "committee_spread_meV": None
        if getattr(pb, "committee_spread", None) is None
        else 1e3 * pb.committee_spread,
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
    if near_null:
        lines.append(
            f"warning: {near_null} occupied level(s) lie along S's near-null directions "
            f"(|c|^2 > 50; GPAW's stay far below): spurious levels of the predicted H, each "
            f"moving E_F by one state; try --overlap-cutoff (e.g. 1e-2 to 3e-2)"
        )
    if summary["committee_spread_meV"] is not None:
        lines.append(
            f"committee of {len(calc.model.members)} models: their H differ from their mean "
            f"by {summary['committee_spread_meV']:.2f} meV on average"
        )
    if hole_info is not None:
        per = hole_info["per_cm2"]
        err = hole_info["holes_stderr"]
        lines.append(
            f"holes: {hole_info['holes']:.4g}"
            + ("" if err is None else f" +- {err:.2g} (KPM's stochastic standard error)")
            + f" states of {'+'.join(holes)} in [E_F, E_F + {hole_window:g} eV]"
            + (f" = {per:.3g} cm^-2" if per else "")
        )
    return summary, lines


# -- many structures ------------------------------------------------------------------
SUMMARY_COLUMNS = ["structure", "atoms", "orbitals", "method", "fermi_level_eV", "gap_eV"]


def _predict_task(task) -> tuple[str, str, object]:
    """One structure of a batch: ("done", name, summary) or ("failed", name, message)."""
    structure, model, dest, options = task
    name = Path(structure).stem
    try:
        summary = predict_structure(
            structure, model, dest, progress=False, log=lambda *a: None, **options
        )
        return "done", name, summary
    except (GearsHError, OSError, ValueError) as err:
        return "failed", name, " ".join(str(err).split())
    except Exception as err:  # isolate unexpected failures too
        return "failed", name, f"{type(err).__name__}: {err}"


def _predict_task_in_worker(task):
    try:
        return _predict_task(task)
    except BaseException:  # SIGTERM from the parent (or its death): leave now
        import os
        import signal

        os._exit(128 + signal.SIGTERM)


def predict_many(
    structures,
    model,
    output,
    jobs: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    **options,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict many structure files into ``output/<file stem>/`` (each folder as
    :func:`predict_structure` writes it), resumable: a structure whose folder holds a
    ``summary.json`` is skipped unless ``overwrite``.  ``jobs > 1``: worker processes
    (each loads the model once).  Failures are isolated.  Writes ``output/summary.csv``
    (one row per finished structure: size, E_F, gap, holes) and returns
    ``(rows, failed)``."""
    from tqdm import tqdm

    from .core.processes import WORKER_THREADS, run_pool

    paths = [Path(s) for s in structures]
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise PredictError(
            f"structure files share the stem(s) {dup}: their output folders would collide; "
            f"rename them"
        )
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise PredictError(f"--jobs must be an integer >= 1, got {jobs!r}")
    _check_method_args(
        options.get("width", 0.1),
        options.get("npts", 2001),
        options.get("emin"),
        options.get("emax"),
        options.get("method", "auto"),
    )
    options["holes"] = _check_holes(options.get("holes"), options.get("hole_window", 0.2))
    _check_pdos(options.get("pdos", "species"), options["holes"])
    out = check_output_folder(output, overwrite=True)  # may exist: the batch resumes
    out.mkdir(parents=True, exist_ok=True)
    todo = [
        (str(p), str(model), str(out / p.stem), dict(options, overwrite=overwrite))
        for p in paths
        if overwrite or not (out / p.stem / "summary.json").is_file()
    ]
    log(
        f"{len(paths)} structures: {len(paths) - len(todo)} already done, {len(todo)} to "
        f"predict with {min(jobs, max(len(todo), 1))} process(es) -> {out}/"
    )
    if jobs == 1 or len(todo) < 2:
        results = (_predict_task(t) for t in todo)
    else:
        results = run_pool(
            _predict_task_in_worker, todo, min(jobs, len(todo)), environment_values=WORKER_THREADS
        )
    failed = []
    with (
        contextlib.closing(results) as it,
        tqdm(total=len(todo), desc="predict", unit="structure", disable=not progress) as bar,
    ):
        for kind, name, value in it:
            if kind == "failed":
                failed.append((name, value))
                log(f"FAILED {name}: {value}")
            bar.update()
    rows = []
    for p in paths:
        f = out / p.stem / "summary.json"
        if f.is_file():
            s = json.loads(f.read_text())
            row = {k: s.get(k) for k in SUMMARY_COLUMNS}
            row["structure"] = p.stem
            h = s.get("holes") or {}
            row["holes"] = h.get("holes")
            row["holes_stderr"] = h.get("holes_stderr")
            row["holes_per_cm2"] = h.get("per_cm2")
            rows.append(row)
    _write_summary_table(out / "summary.csv", rows)
    return rows, failed


def _write_summary_table(path: Path, rows: list[dict]) -> None:
    import csv

    buf = io.StringIO()
    cols = SUMMARY_COLUMNS + ["holes", "holes_stderr", "holes_per_cm2"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    _write_text(path, buf.getvalue())


def format_summary_table(rows: list[dict]) -> str:
    """The batch summary as aligned text (what ``gearsh predict`` prints)."""
    head = f"{'structure':24s} {'atoms':>6s} {'orbitals':>8s} {'E_F (eV)':>9s} {'gap (eV)':>8s}"
    head += f" {'holes':>9s} {'holes/cm2':>10s}"
    lines = [head]

    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    for r in rows:
        lines.append(
            f"{r['structure'][:24]:24s} {fmt(r['atoms'], '6d')} {fmt(r['orbitals'], '8d')} "
            f"{fmt(r['fermi_level_eV'], '9.4f')} {fmt(r['gap_eV'], '8.3f')} "
            f"{fmt(r['holes'], '9.4g')} {fmt(r['holes_per_cm2'], '10.3g')}"
        )
    return "\n".join(lines)
