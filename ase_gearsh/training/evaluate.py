"""``gearsh eval model.ckpt DATASET``: H and eigenvalue errors against the DFT reference.

H MAE (meV) over every stored matrix element (on-site, pair, all); eigenvalue
MAE (meV) within +-5 eV of the Fermi level and over all states, from the
predicted H with the dataset's exact S at the reference k-points.  Averages
are per structure, then over structures (as in the paper), and also over all
values pooled.  For a committee (``gearsh committee``) also the members' spread per
structure and its rank correlation with the H MAE.  Writes ``summary.json``,
``structures.csv`` and PNGs (parity, error CDFs, eigenvalue errors against energy)
when an output folder is given.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from scipy.linalg import eigvalsh

from ..core.blocks import assemble
from ..core.data import Dataset
from ..core.errors import GearsHError
from ..core.io import atomic_write_text, check_output_folder, new_figure, save_figure
from ..electronic.dense import (
    NEAR_NULL_NORM,
    check_overlap_cutoff,
    coefficient_norms,
    solve_dense,
)
from ..model.engine import Model
from ..model.inference import Predictor, predictor_for

__all__ = ["evaluate", "predict_structure_blocks", "EvaluationError"]


class EvaluationError(GearsHError, ValueError):
    """A dataset that cannot be evaluated with this model."""


WINDOW = 5.0  # eV around the Fermi level


def predict_structure_blocks(predictor: Predictor, structure, info: dict | None = None):
    """Predicted flat on-site and pair blocks (GPAW order, eV) of a dataset
    structure, through the prediction path users run, in the dataset's pair order.
    ``info``: a dict that receives the prediction's ``committee_spread`` (eV)."""
    model = predictor.model
    name = structure.meta["source"]["name"]
    model.registry.check_basis(structure.basis, name)
    bm = predictor(structure.atoms)
    if info is not None:
        info["committee_spread"] = getattr(bm, "committee_spread", None)
    counts = structure.orbital_counts
    a = structure.arrays
    sizes = counts[bm.pair_i] * counts[bm.pair_j]
    start = np.concatenate([[0], np.cumsum(sizes)])
    key = {
        (int(i), int(j), *map(int, R)): p
        for p, (i, j, R) in enumerate(zip(bm.pair_i, bm.pair_j, bm.pair_shift))
    }
    out = np.zeros_like(a["pair_H"][0], dtype=np.float64)
    off = a["pair_offsets"]
    matched = 0
    for p, ((i, j), R) in enumerate(zip(a["pair_ij"], a["pair_shift"])):
        q = key.get((int(i), int(j), *map(int, R)))
        if q is not None:
            out[off[p] : off[p + 1]] = bm.pairs[start[q] : start[q + 1]]
            matched += 1
    if matched != len(key):
        raise EvaluationError(
            f"{name}: {len(key) - matched} predicted pairs are not stored "
            f"in the dataset; re-extract it without --threshold"
        )
    return bm.onsite, out


def aligned_window_errors(e, ref, window) -> tuple[int, np.ndarray]:
    """(offset o, errors e[n + o] - ref[n] of the window's levels n) for the integer o
    that minimises their mean |error| (ties: the smallest |o|).

    ``e``: all predicted eigenvalues at one k-point, sorted; ``ref``: the reference's,
    sorted; ``window``: boolean mask over ``ref``.  A predicted H that puts o spurious
    levels below the window (o > 0), or loses -o levels there, pairs every window level
    with the wrong reference level when levels are compared by index; o is the error
    of the state count below the window (what E_F by electron counting gets wrong), and
    the errors at o are the accuracy of the levels themselves."""
    e, ref = np.asarray(e, float), np.asarray(ref, float)
    idx = np.flatnonzero(window)
    if not idx.size:
        return 0, np.zeros(0)
    offs = np.arange(-idx[0], len(e) - idx[-1])
    if not offs.size:
        raise EvaluationError(
            f"{len(e)} predicted levels cannot hold the {idx[-1] - idx[0] + 1} levels of the window"
        )
    offs = offs[np.argsort(np.abs(offs), kind="stable")]  # ties: the smallest |o|
    cost = [np.abs(e[idx + o] - ref[idx]).mean() for o in offs]
    o = int(offs[int(np.argmin(cost))])
    return o, e[idx + o] - ref[idx]


def evaluate(
    model_path,
    dataset,
    output=None,
    limit=None,
    progress=True,
    validation_only=False,
    overlap_cutoff: float = 0.0,
) -> dict:
    """Errors of a model on a dataset (``validation_only``: the structures the
    checkpoint was validated on, matched by source file name).  ``overlap_cutoff`` > 0:
    the predicted eigenvalues by canonical orthogonalisation (the calculator's
    parameter of that name), compared with the DFT eigenvalues of the full basis; the
    same cut-off applied to the DFT H gives ``eig_mae_window_cutoff_floor_meV``, the
    part of the error that the cut-off itself causes."""
    from tqdm.auto import tqdm

    overlap_cutoff = check_overlap_cutoff(overlap_cutoff)

    if limit is not None and int(limit) < 1:
        raise EvaluationError(f"limit must be a positive number of structures, got {limit}")
    if output is not None:  # before the work: not a file, not under one
        check_output_folder(output, overwrite=True)
    model = model_path if isinstance(model_path, Model) else Model.from_checkpoint(model_path)
    predictor = predictor_for(model)
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    structures = (ds[k] for k in range(len(ds)))
    if validation_only:
        names = set(getattr(model, "extra", {}).get("valid_names", []))
        structures = [s for s in structures if s.meta["source"]["name"] in names]
        if not structures:
            raise EvaluationError(
                f"none of the checkpoint's {len(names)} validation structures is in {ds.path}"
            )
    structures = (
        list(structures) if limit is None else [s for _, s in zip(range(limit), structures)]
    )
    n = len(structures)
    spin = [s.meta["source"]["name"] for s in structures if s.nspins != 1]
    if spin:
        raise EvaluationError(
            f"{len(spin)} structure(s) of {ds.path} hold spin-polarised data (nspins=2, "
            f"e.g. {spin[0]}); the model predicts spin-paired Hamiltonians (nspins=1)"
        )
    rows, pooled = [], {"ref": [], "pred": [], "onsite": [], "eig_err": [], "eig_ref": []}
    s_min = np.inf  # smallest eigenvalue of any S(k): near-linear dependence of the basis
    for s in tqdm(structures, desc="evaluate", unit="structure", disable=not progress):
        got = {}
        on, pr = predict_structure_blocks(predictor, s, got)
        a = s.arrays
        d_on = on - a["onsite_H"][0]
        d_pr = pr - a["pair_H"][0]
        errs, eref, floor, aligned, offsets, near_null = [], [], [], [], [], []
        for kpt, ref in zip(a["kpts"], a["eigenvalues"][0]):
            Hk = assemble(a["orbital_counts"], on, a["pair_ij"], a["pair_shift"], pr, kpt=kpt)
            Sk = s.overlap(kpt)
            s_min = min(s_min, float(eigvalsh(Sk, subset_by_index=[0, 0])[0]))
            if overlap_cutoff > 0:
                e_all, norms, _ = coefficient_norms(Hk, Sk, overlap_cutoff)
                Hr = s.hamiltonian(kpt)
                e0 = solve_dense(Hr, Sk, n_keep=len(e_all))[0]  # the same directions kept
                n_b = min(len(e_all), len(ref))
                e, ref, e0 = e_all[:n_b], ref[:n_b], e0[:n_b]
                floor.append(e0 - ref)
            else:
                e_all, norms, _ = coefficient_norms(Hk, Sk)
                e = e_all[: len(ref)]
            o, d = aligned_window_errors(e_all, ref, np.abs(ref - s.fermi_level) <= WINDOW)
            offsets.append(o)
            near_null.append(int(((e_all < s.fermi_level) & (norms > NEAR_NULL_NORM)).sum()))
            aligned.append(d)
            errs.append(e - ref)
            eref.append(ref)
        errs, eref = np.concatenate(errs), np.concatenate(eref)
        window = np.abs(eref - s.fermi_level) <= WINDOW
        # the uniform part of the eigenvalue errors: an H error proportional to S
        # shifts every eigenvalue by the same amount (H + cS has eigenvalues E + c)
        shift = errs[window].mean() if window.any() else float("nan")
        aligned = np.concatenate(aligned)
        worst = max(offsets, key=abs)
        rows.append(
            {
                "name": s.meta["source"]["name"],
                "atoms": len(s.atoms),
                "h_mae_onsite_meV": 1e3 * np.abs(d_on).mean(),
                "h_mae_pair_meV": 1e3 * np.abs(d_pr).mean() if d_pr.size else 0.0,
                "h_mae_meV": 1e3 * np.abs(np.concatenate([d_on, d_pr])).mean(),
                "eig_mae_window_meV": 1e3 * np.abs(errs[window]).mean()
                if window.any()
                else float("nan"),
                "eig_mae_all_meV": 1e3 * np.abs(errs).mean(),
                "eig_shift_meV": 1e3 * shift,
                "eig_mae_window_unshifted_meV": 1e3 * np.abs(errs[window] - shift).mean()
                if window.any()
                else float("nan"),
                "eig_mae_window_aligned_meV": 1e3 * np.abs(aligned).mean()
                if aligned.size
                else float("nan"),
                "eig_level_offset": worst,
                "near_null_occupied": max(near_null),
            }
        )
        if floor:
            floor = np.concatenate(floor)
            rows[-1]["eig_mae_window_cutoff_floor_meV"] = (
                1e3 * np.abs(floor[window]).mean() if window.any() else float("nan")
            )
        if got.get("committee_spread") is not None:
            rows[-1]["committee_spread_meV"] = 1e3 * got["committee_spread"]
        pooled["ref"].append(np.concatenate([a["onsite_H"][0], a["pair_H"][0]]))
        pooled["pred"].append(np.concatenate([on, pr]))
        pooled["onsite"].append(np.r_[np.ones(on.size, bool), np.zeros(pr.size, bool)])
        pooled["eig_err"].append(errs)
        pooled["eig_ref"].append(eref - s.fermi_level)
    p = {k: np.concatenate(v) for k, v in pooled.items()}
    herr = np.abs(p["pred"] - p["ref"])
    summary = {
        "model": str(getattr(model, "path", None) or model_path),
        "dataset": str(ds.path),
        "structures": n,
    }
    for key in (
        "h_mae_onsite_meV",
        "h_mae_pair_meV",
        "h_mae_meV",
        "eig_mae_window_meV",
        "eig_mae_all_meV",
        "eig_mae_window_unshifted_meV",
        "eig_mae_window_aligned_meV",
    ):
        summary[key] = float(np.nanmean([r[key] for r in rows]))
    summary["eig_abs_shift_meV"] = float(np.nanmean([abs(r["eig_shift_meV"]) for r in rows]))
    summary["eig_level_offset_max"] = int(max(abs(r["eig_level_offset"]) for r in rows))
    summary["near_null_occupied_max"] = int(max(r["near_null_occupied"] for r in rows))
    summary["overlap_cutoff"] = overlap_cutoff
    summary["overlap_min_eigenvalue"] = s_min
    if overlap_cutoff > 0:
        summary["eig_mae_window_cutoff_floor_meV"] = float(
            np.nanmean([r["eig_mae_window_cutoff_floor_meV"] for r in rows])
        )
    if "committee_spread_meV" in rows[0]:  # a committee: does its spread follow the error?
        spread = np.array([r["committee_spread_meV"] for r in rows])
        summary["committee_members"] = len(model.members)
        summary["committee_spread_meV"] = float(spread.mean())
        if n >= 3:
            from scipy.stats import spearmanr

            rho = spearmanr(spread, [r["h_mae_meV"] for r in rows]).statistic
            summary["committee_spread_spearman"] = float(rho)
    summary["per_structure"] = [
        {
            k: v if k in ("name", "atoms", "eig_level_offset", "near_null_occupied") else float(v)
            for k, v in r.items()
        }
        for r in rows
    ]
    summary["pooled"] = {
        "h_mae_onsite_meV": float(1e3 * herr[p["onsite"]].mean()),
        "h_mae_pair_meV": float(1e3 * herr[~p["onsite"]].mean()),
        "h_mae_meV": float(1e3 * herr.mean()),
        "h_median_meV": float(1e3 * np.median(herr)),
        "eig_mae_all_meV": float(1e3 * np.abs(p["eig_err"]).mean()),
        "eig_median_meV": float(1e3 * np.median(np.abs(p["eig_err"]))),
    }
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out / "structures.csv", buf.getvalue())
        _plots(out, p, summary)
    return summary


def _cdf(ax, values, label):
    v = np.sort(values[values > 1e-4])  # errors above 0.1 meV, as in the paper
    if len(v):
        ax.semilogx(v * 1e3, np.arange(1, len(v) + 1) / len(v))
    q = np.percentile(values * 1e3, [25, 50, 75])
    ax.set_title(
        f"{label}: quartiles {q[0]:.2g}/{q[1]:.2g}/{q[2]:.2g} meV, "
        f"MAE {values.mean() * 1e3:.3g} meV",
        fontsize=8,
    )
    ax.set_xlabel("|error| (meV)")
    ax.set_ylabel("cumulative fraction")


def _plots(out: Path, p: dict, summary: dict):
    from matplotlib.colors import LogNorm

    fig, ax = new_figure(2, 2, figsize=(10, 8))
    ax[0, 0].hist2d(p["eig_ref"], p["eig_err"] * 1e3, bins=(80, 80), norm=LogNorm(), cmap="viridis")
    ax[0, 0].axvspan(-WINDOW, WINDOW, color="k", alpha=0.06)
    ax[0, 0].set_xlabel("reference eigenvalue - E_F (eV)")
    ax[0, 0].set_ylabel("eigenvalue error (meV)")
    ax[0, 0].set_title(
        f"eigenvalue MAE within +-{WINDOW:g} eV: {summary['eig_mae_window_meV']:.3g} meV",
        fontsize=9,
    )
    ax[0, 1].hist2d(p["ref"], p["pred"] - p["ref"], bins=(100, 100), norm=LogNorm(), cmap="viridis")
    ax[0, 1].set_yscale("asinh", linear_width=1e-3)
    ax[0, 1].set_xlabel("reference H element (eV)")
    ax[0, 1].set_ylabel("error (eV, asinh scale)")
    ax[0, 1].set_title(
        f"H MAE {summary['h_mae_meV']:.3g} meV (on-site "
        f"{summary['h_mae_onsite_meV']:.3g}, pair "
        f"{summary['h_mae_pair_meV']:.3g})",
        fontsize=9,
    )
    _cdf(ax[1, 0], np.abs(p["eig_err"]), "eigenvalues")
    _cdf(ax[1, 1], np.abs(p["pred"] - p["ref"]), "H elements")
    fig.tight_layout()
    save_figure(fig, out / "errors.png")
    fig, ax = new_figure(figsize=(4.5, 4.5))
    lim = [p["ref"].min(), p["ref"].max()]
    ax.hist2d(p["ref"], p["pred"], bins=150, norm=LogNorm(), cmap="viridis")
    ax.plot(lim, lim, "k--", lw=0.5)
    ax.set_xlabel("reference H (eV)")
    ax.set_ylabel("predicted H (eV)")
    fig.tight_layout()
    save_figure(fig, out / "parity.png")
