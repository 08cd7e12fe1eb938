"""Extract H and S blocks per atom pair from GPAW LCAO restart files.

Usage::

    python -m gpaw_tools.extract RUN.gpw [MORE.gpw ...] -o DATASET_DIR

Gamma-only runs give blocks of "neighbour-unique" cells (every atom sees at
most one image of any other atom within the range of H; checked).  Runs on a
Gamma-centred k-point grid give the real-space blocks

    H_ij(R) = 1/Nk sum_k exp(-2 pi i k.R) H_ij(k)

for every pair (i, j, R) within the range of H; the grid must separate all
images (checked).  Spin-polarised runs store both spin channels.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ase_gearsh.core.blocks import assemble
from ase_gearsh.core.errors import GearsHError
from ase_gearsh.core.processes import WORKER_THREADS, Interrupted, interrupt_on_sigterm, run_pool
from ase_gearsh.core.schema import SchemaError, ensure_manifest, read_structure, write_structure

from .basis import calculator_basis
from .gpw import GPWError, open_calculator, read_parameters
from .interactions import check_aliasing, find_interactions, interaction_radii

__all__ = [
    "extract",
    "extract_calculator",
    "extract_files",
    "main",
    "KPointError",
    "VerificationError",
    "EIGENVALUE_TOLERANCE",
    "check_threshold",
    "extract_run",
]


class KPointError(GearsHError, ValueError):
    """The k-points of a run cannot be turned into real-space blocks."""


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kpoint_grid(bzk, ibzk, pbc):
    """Gamma-centred grid size of a run, and the IBZ source of every grid point.

    Returns ``(grid, kfull, ibz_index, conjugate)``: the full grid ``kfull``
    (nk, 3), and for each of its points the IBZ k-point whose H equals H(k)
    (``conjugate``: equals its complex conjugate, by time reversal).
    """
    bzk = np.asarray(bzk, float).reshape(-1, 3)
    ibzk = np.asarray(ibzk, float).reshape(-1, 3)
    grid = np.array([len(np.unique(np.round(bzk[:, c] % 1.0, 8) % 1.0)) for c in range(3)])
    if np.prod(grid) != len(bzk):
        raise KPointError(
            f"the {len(bzk)} k-points of the run do not form a full "
            f"Monkhorst-Pack grid (distinct values per axis: {tuple(grid)})"
        )
    scaled = bzk * grid
    if not np.allclose(scaled, np.round(scaled), atol=1e-6):
        raise KPointError(
            f"the {tuple(int(g) for g in grid)} k-point grid is not Gamma-centred; real-space "
            "blocks need k = n/N. Use kpts={'size': (N1, N2, N3), 'gamma': True}"
        )
    for c in range(3):
        if not pbc[c] and grid[c] != 1:
            raise KPointError(f"{grid[c]} k-points along non-periodic axis {c}")
    n = np.round(scaled).astype(int) % grid
    nib = np.round(ibzk * grid).astype(int) % grid
    if not np.allclose(ibzk * grid, np.round(ibzk * grid), atol=1e-6):
        raise KPointError("IBZ k-points are not on the Gamma-centred grid")
    lookup = {tuple(v): a for a, v in enumerate(nib)}
    ibz_index = np.empty(len(n), int)
    conj = np.zeros(len(n), bool)
    for q, v in enumerate(n):
        if tuple(v) in lookup:
            ibz_index[q] = lookup[tuple(v)]
        elif tuple((-v) % grid) in lookup:
            ibz_index[q] = lookup[tuple((-v) % grid)]
            conj[q] = True
        else:
            raise KPointError(
                "the run used point-group symmetry to reduce the k-points; H(k) at the "
                "other points needs orbital rotations that are not supported. Rerun with "
                "symmetry='off' (or symmetry={'point_group': False})"
            )
    # order the full grid deterministically
    kfull = n / grid
    kfull = np.where(kfull > 0.5 + 1e-9, kfull - 1, kfull)
    return grid, kfull, ibz_index, conj


def _fermi_level(calc):
    try:
        return float(calc.get_fermi_level())
    except Exception:
        return [float(x) for x in calc.get_fermi_levels()]


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def real_space_blocks(Hk, Sk, kfull, counts, inter):
    """Fourier transform H(k), S(k) on the full grid into on-site and pair blocks.

    Hk: (nspins, nk, M, M); Sk: (nk, M, M).  Returns the flat arrays of the
    schema and the largest imaginary part met (eV), which must be round-off.
    """
    nk = len(kfull)
    nspins = Hk.shape[0]
    off = np.concatenate([[0], np.cumsum(counts)])
    onsite_H = np.concatenate(
        [
            Hk[:, :, off[a] : off[a + 1], off[a] : off[a + 1]].mean(axis=1).reshape(nspins, -1)
            for a in range(len(counts))
        ],
        axis=1,
    )
    onsite_S = np.concatenate(
        [
            Sk[:, off[a] : off[a + 1], off[a] : off[a + 1]].mean(axis=0).ravel()
            for a in range(len(counts))
        ]
    )
    max_imag = max(np.abs(onsite_H.imag).max(initial=0), np.abs(onsite_S.imag).max(initial=0))
    ij = inter.ij.astype(np.int64)
    sizes = counts[ij[:, 0]] * counts[ij[:, 1]]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    pair_H = np.zeros((nspins, offsets[-1]))
    pair_S = np.zeros(offsets[-1])
    if len(ij):
        keys, inverse = np.unique(ij, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(keys) + 1))
        for g, (i, j) in enumerate(keys):
            sel = order[bounds[g] : bounds[g + 1]]
            R = inter.shift[sel]
            phase = np.exp(-2j * np.pi * (kfull @ R.T)) / nk  # (nk, r)
            hb = np.einsum(
                "kr,skab->srab", phase, Hk[:, :, off[i] : off[i + 1], off[j] : off[j + 1]]
            )
            sb = np.einsum("kr,kab->rab", phase, Sk[:, off[i] : off[i + 1], off[j] : off[j + 1]])
            max_imag = max(max_imag, np.abs(hb.imag).max(), np.abs(sb.imag).max())
            for q, p in enumerate(sel):
                pair_H[:, offsets[p] : offsets[p + 1]] = hb[:, q].real.reshape(nspins, -1)
                pair_S[offsets[p] : offsets[p + 1]] = sb[q].real.ravel()
    return (onsite_H.real.copy(), onsite_S.real.copy(), offsets, pair_H, pair_S, float(max_imag))


def _calculator_parameters(calc) -> dict:
    params = calc.parameters
    if hasattr(params, "todict"):
        params = params.todict()
    try:
        return dict(params)
    except (TypeError, ValueError):
        return {}


EIGENVALUE_TOLERANCE = 1e-3  # eV: largest accepted |rebuilt - GPAW| eigenvalue


class VerificationError(GearsHError, ValueError):
    """The extracted blocks do not rebuild the run's eigenvalues."""


def check_threshold(threshold, name: str = "threshold") -> float | None:
    """``None`` or a finite number >= 0 (eV); anything else is refused."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of eV >= 0, got {threshold!r}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of eV >= 0, got {threshold!r}")
    return value


def _gpaw_atoms(calc):
    """The run's atoms with GPAW's own (wrapped) scaled positions."""
    atoms = calc.get_atoms()
    spos = getattr(calc, "spos_ac", None)
    if spos is None:
        spos = atoms.get_scaled_positions(wrap=False)
        spos[:, atoms.pbc] %= 1.0
    atoms = atoms.copy()
    atoms.set_scaled_positions(np.asarray(spos))
    return atoms


def _drop_small_blocks(blocks: dict, threshold: float) -> dict:
    """Pair blocks whose largest |H| (any spin) is below ``threshold`` removed."""
    sizes = np.diff(blocks["pair_offsets"])
    n = len(sizes)
    blk = np.repeat(np.arange(n), sizes)
    peak = np.zeros(n)
    np.maximum.at(peak, blk, np.abs(blocks["pair_H"]).max(axis=0, initial=0.0))
    keep = peak >= threshold
    keep_el = keep[blk]
    out = dict(blocks)
    for key in ("pair_ij", "pair_shift", "pair_vector"):
        out[key] = blocks[key][keep]
    out["pair_H"] = blocks["pair_H"][:, keep_el]
    out["pair_S"] = blocks["pair_S"][keep_el]
    out["pair_offsets"] = np.concatenate([[0], np.cumsum(sizes[keep])]).astype(np.int64)
    return out


def _rebuild_errors(blocks: dict, counts, kpts, H_skMM, S_kMM, eps) -> dict:
    """Largest |rebuilt - GPAW| of H(k), S(k) and of the eigenvalues at every k."""
    from scipy.linalg import eigh

    b = blocks
    err_h = err_e = 0.0
    for k, kpt in enumerate(kpts):
        S_re = assemble(counts, b["onsite_S"], b["pair_ij"], b["pair_shift"], b["pair_S"], kpt=kpt)
        err_h = max(err_h, np.abs(S_re - S_kMM[k]).max())
        for s in range(len(H_skMM)):
            H_re = assemble(
                counts, b["onsite_H"][s], b["pair_ij"], b["pair_shift"], b["pair_H"][s], kpt=kpt
            )
            err_h = max(err_h, np.abs(H_re - H_skMM[s, k]).max())
            e = eigh(H_re, S_re, eigvals_only=True)[: eps.shape[2]]
            err_e = max(err_e, np.abs(e - eps[s, k, : len(e)]).max())
    return {"max_matrix_error": float(err_h), "max_eigenvalue_error": float(err_e)}


def _grid_info(calc, atoms):
    try:
        gpts = np.asarray(calc.get_number_of_grid_points())
        return [int(g) for g in gpts], (atoms.cell.lengths() / gpts).tolist()
    except Exception:
        return None, None


def extract_calculator(
    calc,
    source: dict | None = None,
    threshold: float | None = None,
    verify: bool = True,
    parameters: dict | None = None,
    eigenvalue_tolerance: float = EIGENVALUE_TOLERANCE,
):
    """Arrays and metadata of the dataset schema from a GPAW LCAO calculator.

    ``parameters``: the run's input parameters (as read from the .gpw file);
    taken from the calculator if not given.  With ``verify`` (default) the
    blocks must rebuild every H(k), S(k) of the run and its eigenvalues to
    ``eigenvalue_tolerance`` eV, else :class:`VerificationError` (the errors are
    recorded in ``meta["checks"]`` either way).
    """
    import gpaw
    from gpaw.lcao.tools import get_lcao_hamiltonian

    threshold = check_threshold(threshold)
    atoms = _gpaw_atoms(calc)
    nspins = int(calc.get_number_of_spins())
    species, counts, basis_rc, proj_rc = calculator_basis(calc)
    ibzk = np.asarray(calc.get_ibz_k_points(), float).reshape(-1, 3)
    grid, kfull, ibz_index, conj = kpoint_grid(calc.get_bz_k_points(), ibzk, atoms.pbc)
    inter = find_interactions(atoms, basis_rc, proj_rc)
    check_aliasing(atoms, inter, grid, basis_rc, proj_rc)

    H_skMM, S_kMM = (np.asarray(x) for x in get_lcao_hamiltonian(calc))
    if H_skMM.shape[0] != nspins:
        raise RuntimeError(f"GPAW returned {H_skMM.shape[0]} spin channels, expected {nspins}")
    Hk = np.where(conj[None, :, None, None], np.conj(H_skMM[:, ibz_index]), H_skMM[:, ibz_index])
    Sk = np.where(conj[:, None, None], np.conj(S_kMM[ibz_index]), S_kMM[ibz_index])
    onsite_H, onsite_S, offsets, pair_H, pair_S, max_imag = real_space_blocks(
        Hk, Sk, kfull, counts, inter
    )
    blocks = {
        "onsite_H": onsite_H,
        "onsite_S": onsite_S,
        "pair_ij": inter.ij,
        "pair_shift": inter.shift,
        "pair_vector": inter.vector,
        "pair_offsets": offsets,
        "pair_H": pair_H,
        "pair_S": pair_S,
    }
    if threshold is not None:
        blocks = _drop_small_blocks(blocks, threshold)
    eps = np.array(
        [[calc.get_eigenvalues(kpt=k, spin=s) for k in range(len(ibzk))] for s in range(nspins)],
        dtype=float,
    )
    checks = {"max_imaginary_part": max_imag}
    if verify:
        checks.update(_rebuild_errors(blocks, counts, ibzk, H_skMM, S_kMM, eps))
        err = checks["max_eigenvalue_error"]
        if not err <= eigenvalue_tolerance:
            what = f" with --threshold {threshold:g} eV dropping small blocks" if threshold else ""
            raise VerificationError(
                f"the extracted blocks rebuild GPAW's eigenvalues only to {err:.3g} eV"
                f"{what}; expected <= {eigenvalue_tolerance:g} eV. The file may be damaged "
                f"or inconsistent; raise --eigenvalue-tolerance only if this is intended"
            )

    arrays = {
        "numbers": atoms.numbers.astype(np.int32),
        "positions": atoms.positions.astype(float),
        "cell": np.asarray(atoms.cell, float),
        "pbc": np.asarray(atoms.pbc, bool),
        "orbital_counts": counts.astype(np.int32),
        "onsite_H": blocks["onsite_H"],
        "onsite_S": blocks["onsite_S"],
        "pair_ij": blocks["pair_ij"].astype(np.int32),
        "pair_shift": blocks["pair_shift"].astype(np.int32),
        "pair_vector": blocks["pair_vector"].astype(float),
        "pair_offsets": blocks["pair_offsets"].astype(np.int64),
        "pair_H": blocks["pair_H"],
        "pair_S": blocks["pair_S"],
        "kpts": ibzk,
        "kpt_weights": np.asarray(calc.get_k_point_weights(), float),
        "eigenvalues": eps,
    }
    params = parameters if parameters is not None else _calculator_parameters(calc)
    gpts, spacing = _grid_info(calc, atoms)
    radii = interaction_radii(basis_rc, proj_rc)
    meta = {
        "fermi_level": _fermi_level(calc),
        "n_electrons": float(calc.get_number_of_electrons()),
        "total_energy": float(calc.get_potential_energy()),
        "nspins": nspins,
        "basis": species,
        "kgrid": [int(g) for g in grid],
        "xc": str(calc.get_xc_functional()),
        "h": params.get("h"),
        "grid_points": gpts,
        "grid_spacing": spacing,
        "block_threshold": threshold,
        "interaction_range": {
            "rule": "d_ij < rc_i + rc_j + 2 max(projector_rc)",
            "max": float(2 * radii.max()),
        },
        "checks": checks,
        "gpaw": {"version_reader": gpaw.__version__, "parameters": _json_safe(params)},
        "source": source or {"name": None},
    }
    return arrays, meta


def extract(
    path,
    threshold=None,
    verify=True,
    sha256=None,
    eigenvalue_tolerance: float = EIGENVALUE_TOLERANCE,
):
    """Read one .gpw file and return (arrays, meta) of the dataset schema.

    ``sha256``: the file's hash if already known (it is computed otherwise).
    """
    path = Path(path)
    params = read_parameters(path)
    source = _source(path, sha256 or file_sha256(path), params)
    calc = open_calculator(path, checked=True)
    return extract_calculator(
        calc,
        source=source,
        threshold=threshold,
        verify=verify,
        parameters=params,
        eigenvalue_tolerance=eigenvalue_tolerance,
    )


def _source(path: Path, sha: str, params: dict) -> dict:
    """The ``source`` metadata of a .gpw file (pops the writer's version from params)."""
    return {
        "name": path.name,
        "path": str(path.resolve()),
        "sha256": sha,
        "size": path.stat().st_size,
        "gpaw_version_writer": params.pop("_gpaw_version", None),
    }


def extract_run(
    calc,
    gpw,
    outdir,
    threshold=None,
    verify: bool = True,
    eigenvalue_tolerance: float = EIGENVALUE_TOLERANCE,
) -> Path:
    """Extract a finished calculator right after its run was written to ``gpw``,
    without reading the file back (no GPAW restart); the dataset entry is the one
    :func:`extract_files` would write for ``gpw`` (same name and source).  Returns
    the entry (an existing entry of the same source is kept)."""
    gpw, outdir = Path(gpw), Path(outdir)
    ensure_manifest(outdir)
    sha = file_sha256(gpw)
    out, done = _target(outdir, gpw, sha)
    if done:
        return out
    existed = out.exists()
    params = read_parameters(gpw)
    source = _source(gpw, sha, params)
    arrays, meta = extract_calculator(
        calc,
        source=source,
        threshold=threshold,
        verify=verify,
        parameters=params,
        eigenvalue_tolerance=eigenvalue_tolerance,
    )
    return _write_new(outdir, gpw, sha, out, arrays, meta, existed)


def _target(outdir: Path, src: Path, sha: str) -> tuple[Path, bool]:
    """Output file for a source; True if it already holds this exact source."""
    for name in (f"{src.stem}.npz", f"{src.stem}-{sha[:10]}.npz"):
        out = outdir / name
        if not out.exists():
            return out, False
        try:
            _, meta = read_structure(out)
        except SchemaError:
            return out, False  # damaged: rewrite it
        if meta["source"].get("sha256") == sha:
            return out, True
    raise FileExistsError(
        f"{outdir}: {src.stem}.npz and {src.stem}-{sha[:10]}.npz exist for other sources"
    )


def _write_new(outdir: Path, src: Path, sha: str, out: Path, arrays, meta, replace: bool) -> Path:
    """Write a structure to ``out``.  ``replace``: ``out`` held this source's own (or a
    damaged) entry when it was chosen.  Otherwise a file found there now was created
    meanwhile by another process (a concurrent extraction into the same dataset): it
    is never replaced, the target is chosen again."""
    if replace:
        write_structure(out, arrays, meta)
        return out
    for _ in range(3):
        try:
            write_structure(out, arrays, meta, exclusive=True)
            return out
        except FileExistsError:
            out, done = _target(outdir, src, sha)
            if done:  # the other process extracted this very file
                write_structure(out, arrays, meta)
                return out
    raise FileExistsError(f"{outdir}: could not claim a file name for {src} (concurrent writers)")


def _extract_one(task) -> tuple[str, Path, object]:
    """Extract one file: ``("written", path, out)``, ``("skipped", path, out)`` or
    ``("failed", path, message)`` (ordinary exceptions are caught and returned)."""
    path, outdir, threshold, verify, overwrite, eigenvalue_tolerance = task
    try:
        if not path.is_file():
            raise GPWError(f"{str(path)!r}: no such file")
        sha = file_sha256(path)
        out, done = _target(outdir, path, sha)
        existed = out.exists()
        if done and not overwrite:
            return "skipped", path, out
        arrays, meta = extract(
            path,
            threshold=threshold,
            verify=verify,
            sha256=sha,
            eigenvalue_tolerance=eigenvalue_tolerance,
        )
        return "written", path, _write_new(outdir, path, sha, out, arrays, meta, existed)
    except (ValueError, OSError) as err:  # GPWError, KPointError, AliasingError
        return "failed", path, str(err)
    except Exception as err:  # isolate unexpected failures too, with detail
        return "failed", path, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"


def _extract_in_worker(task):
    """:func:`_extract_one` in a pool worker: an interrupt (SIGTERM from the parent,
    or its death) ends the process once the atomic write has cleaned up."""
    try:
        return _extract_one(task)
    except BaseException:
        os._exit(128 + signal.SIGTERM)


def extract_files(
    paths,
    outdir,
    threshold=None,
    verify=True,
    overwrite=False,
    progress=True,
    log=print,
    eigenvalue_tolerance: float = EIGENVALUE_TOLERANCE,
    jobs: int = 1,
):
    """Extract many files into one dataset; failures are isolated and returned.

    ``jobs > 1``: that many worker processes (one BLAS thread each), with the same
    guarantees: every entry is written atomically, a file is never replaced by a
    concurrent writer's, and an interrupted run resumes where it stopped.  Returns
    ``(written, skipped, failed)`` lists in input order; ``failed`` holds
    ``(path, message)``.
    """
    threshold = check_threshold(threshold)
    eigenvalue_tolerance = check_threshold(eigenvalue_tolerance, "the eigenvalue tolerance")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    outdir = Path(outdir)
    ensure_manifest(outdir)
    paths = [Path(p) for p in paths]
    tasks = [(p, outdir, threshold, verify, overwrite, eigenvalue_tolerance) for p in paths]
    if jobs == 1 or len(tasks) < 2:
        results = (_extract_one(t) for t in tasks)
    else:
        results = run_pool(
            _extract_in_worker, tasks, min(jobs, len(tasks)), environment_values=WORKER_THREADS
        )
    from tqdm import tqdm

    done: dict[Path, tuple] = {}
    with (
        contextlib.closing(results) as it,
        tqdm(total=len(tasks), desc="extract", unit="file", disable=not progress) as bar,
    ):
        for kind, path, value in it:
            done[path] = (kind, value)
            if kind == "failed":
                log(f"FAILED {path}: {value}", file=sys.stderr)
            bar.update()
    written = [done[p][1] for p in paths if done[p][0] == "written"]
    skipped = [done[p][1] for p in paths if done[p][0] == "skipped"]
    failed = [(p, done[p][1].split("\n")[0]) for p in paths if done[p][0] == "failed"]
    return written, skipped, failed


def main(argv: list[str] | None = None) -> int:
    """``python -m gpaw_tools.extract``: exit status 0, 1 (some files failed, each
    named on stderr) or 2 (unusable output folder, one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m gpaw_tools.extract",
        description="Extract H and S blocks per atom pair from GPAW LCAO .gpw files "
        "into a dataset directory (see docs/dataset.md).",
    )
    parser.add_argument("gpw", nargs="+", help="GPAW LCAO restart files")
    parser.add_argument(
        "-o",
        "--output",
        default="dataset",
        help="dataset directory (created if needed; default: dataset)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="EV",
        help="drop pair blocks whose largest |H| is below EV (recorded); "
        "default: keep every block within the range of H",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip rebuilding H(k) and the eigenvalues of every k-point",
    )
    parser.add_argument(
        "--eigenvalue-tolerance",
        type=float,
        default=EIGENVALUE_TOLERANCE,
        metavar="EV",
        help="refuse a file whose blocks rebuild GPAW's eigenvalues worse "
        f"than EV (default {EIGENVALUE_TOLERANCE:g}; raise it on purpose "
        "with --threshold)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="re-extract files already in the dataset"
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    t0 = time.perf_counter()
    try:
        with interrupt_on_sigterm():
            written, skipped, failed = extract_files(
                args.gpw,
                args.output,
                threshold=args.threshold,
                verify=not args.no_verify,
                overwrite=args.overwrite,
                progress=not args.quiet,
                eigenvalue_tolerance=args.eigenvalue_tolerance,
                jobs=args.jobs,
            )
    except Interrupted as stop:
        print(
            f"{parser.prog}: interrupted ({stop}); the structures written are complete, "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + stop.signum
    except (OSError, ValueError, GearsHError) as err:
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(
        f"{len(written)} extracted, {len(skipped)} already present, {len(failed)} failed "
        f"-> {args.output} ({dt:.1f} s)"
    )
    for path, msg in failed:
        print(f"  failed: {path}: {msg}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
