"""Demo: a shipped model predicts H for new geometries of its training molecules; GPAW checks.

    python -m ase_gearsh.demo [--model models/molecules.ckpt] [--output demo-output]

1. makes five new snapshots (ethanol, acetamide, nitromethane, pyrrole, formic
   acid; rattled and rotated with a seed the training set did not use);
2. predicts H with ``GearsHCalculator`` (exact S from the stored basis
   functions) and solves for eigenvalues, Fermi level and DOS;
3. runs GPAW LCAO (szp(dzp), PBE, h = 0.2 A, the training settings) on the same
   structures and extracts GPAW's H and S;
4. prints H MAE, eigenvalue MAE (states within E_F +- 5 eV, and all computed
   states) and the speed-up over the GPAW SCF; writes ``dos.png`` (model vs
   GPAW DOS per molecule) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase.io import write
from scipy.linalg import eigh

from gpaw_tools.extract import extract_files
from gpaw_tools.generate import RunSettings, _prepare, run_structure

from .calculator import GearsHCalculator
from .core.data import Dataset
from .core.io import atomic_write_text, new_figure, save_figure
from .electronic.dense import gaussian_dos
from .model.engine import enable_compilation_cache, load_model
from .samples import molecule_snapshots

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "molecules.ckpt"


def _h_mae(H_pred, H_ref) -> float:
    """MAE (eV) over the matrix elements that either H has (union of blocks)."""
    mask = (H_pred != 0) | (H_ref != 0)
    return float(np.abs(H_pred - H_ref)[mask].mean())


def _plot(path: Path, panels: list[dict]) -> None:
    """Model against GPAW density of states, one panel per molecule (no pyplot)."""
    fig, axes = new_figure(len(panels), 1, figsize=(7, 1.9 * len(panels)))
    axes = np.atleast_1d(axes)
    for ax in axes[1:]:
        ax.sharex(axes[0])
    for ax, p in zip(axes, panels):
        ax.fill_between(p["e"], p["dos_ref"], color="0.8", label="GPAW")
        ax.plot(p["e"], p["dos_model"], color="C3", lw=1.2, label="GEARS H model")
        ax.axvline(0.0, color="grey", ls="--", lw=0.8)
        ax.text(
            0.01,
            0.8,
            f"{p['name']}  (eig MAE {p['eig_mae_window_meV']:.0f} meV)",
            transform=ax.transAxes,
            fontsize=9,
        )
        ax.set_ylabel("DOS")
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[0].legend(frameon=False, fontsize=8, loc="upper right")
    axes[-1].set_xlabel("E - E_F(GPAW) (eV)")
    fig.suptitle("Unseen molecules: predicted vs DFT density of states (0.2 eV Gaussian)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _predict(model, images) -> list[dict]:
    """Step 1: the model's H, eigenvalues and Fermi level of every structure."""
    print("\n1. model predictions (H from the network, exact S, dense eigensolver)")
    preds = []
    for k, atoms in enumerate(images):
        calc = GearsHCalculator(model)
        atoms = atoms.copy()
        atoms.calc = calc
        t = time.perf_counter()
        H = calc.get_hamiltonian().toarray()
        eps = calc.get_eigenvalues()
        dt = time.perf_counter() - t
        spread = calc.get_property("committee_spread")  # None for a single model
        preds.append(
            {"H": H, "eps": eps, "ef": calc.get_fermi_level(), "seconds": dt, "spread": spread}
        )
        print(
            f"  {atoms.info['molecule']:9s} {len(atoms):2d} atoms, {H.shape[0]:3d} orbitals: "
            f"{dt:6.2f} s{'  (includes one-time JIT compilation)' if k == 0 else ''}"
        )
    return preds


def _gpaw_reference(images, out: Path, settings) -> tuple[dict, list[float]] | None:
    """Step 2: GPAW LCAO SCF of every structure, extracted into a dataset."""
    print("\n2. GPAW LCAO SCF on the same structures (szp(dzp), PBE, h = 0.2 A)")
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    gpws, scf = [], []
    for k, atoms in enumerate(images):
        t = time.perf_counter()
        gpws.append(run_structure(atoms, f"demo-{k}", runs, settings))
        scf.append(time.perf_counter() - t)
        print(f"  {atoms.info['molecule']:9s} {scf[-1]:6.2f} s")
    _, _, failed = extract_files(gpws, out / "dataset", progress=False, log=lambda *x: None)
    if failed:
        print(f"extraction failed: {failed}", file=sys.stderr)
        return None
    return {s.meta["source"]["name"]: s for s in Dataset(out / "dataset")}, scf


def _compare(images, preds, reference: dict, scf) -> tuple[list[dict], list[dict]]:
    """Step 3: per-structure errors against GPAW, and DOS panels for the plot."""
    rows, panels = [], []
    for k, (atoms, pr) in enumerate(zip(images, preds)):
        s = reference[f"demo-{k}.gpw"]
        H_ref = s.hamiltonian()
        e_ref = eigh(H_ref, s.overlap(), eigvals_only=True)  # all states (GPAW's to 1e-12)
        ef = s.fermi_level
        win = np.abs(e_ref - ef) <= 5.0
        row = {
            "molecule": atoms.info["molecule"],
            "atoms": len(atoms),
            "orbitals": int(H_ref.shape[0]),
            "h_mae_meV": 1e3 * _h_mae(pr["H"], H_ref),
            "eig_mae_window_meV": 1e3 * float(np.abs(pr["eps"] - e_ref)[win].mean()),
            "eig_mae_all_meV": 1e3 * float(np.abs(pr["eps"] - e_ref).mean()),
            "fermi_model_eV": pr["ef"],
            "fermi_gpaw_eV": ef,
            "gpaw_scf_s": scf[k],
            "model_s": pr["seconds"],
        }
        if pr["spread"] is not None:  # a committee: its own error estimate, without DFT
            row["committee_spread_meV"] = 1e3 * pr["spread"]
        rows.append(row)
        e = np.linspace(ef - 25, ef + 10, 1401)
        panels.append(
            {
                "name": row["molecule"],
                "e": e - ef,
                "dos_ref": gaussian_dos(e_ref[None], [1.0], e, 0.2),
                "dos_model": gaussian_dos(pr["eps"][None], [1.0], e, 0.2),
                "eig_mae_window_meV": row["eig_mae_window_meV"],
            }
        )
    return rows, panels


def _report(rows, scf) -> dict:
    """Print the comparison table and the totals; returns the summary figures."""
    print("\n3. model vs GPAW")
    spread = "committee_spread_meV" in rows[0]
    print(
        f"  {'molecule':9s} {'H MAE':>9s} {'eig MAE':>9s} {'eig MAE':>9s} {'E_F model':>10s} "
        f"{'E_F GPAW':>9s} {'GPAW':>7s} {'model':>7s}" + (f" {'spread':>7s}" if spread else "")
    )
    print(
        f"  {'':9s} {'meV':>9s} {'+-5 eV':>9s} {'all':>9s} {'eV':>10s} {'eV':>9s} "
        f"{'s':>7s} {'s':>7s}" + (f" {'meV':>7s}" if spread else "")
    )
    for r in rows:
        print(
            f"  {r['molecule']:9s} {r['h_mae_meV']:9.1f} {r['eig_mae_window_meV']:9.1f} "
            f"{r['eig_mae_all_meV']:9.1f} {r['fermi_model_eV']:10.3f} "
            f"{r['fermi_gpaw_eV']:9.3f} {r['gpaw_scf_s']:7.2f} {r['model_s']:7.2f}"
            + (f" {r['committee_spread_meV']:7.1f}" if spread else "")
        )
    if spread:
        print(
            "  spread: the committee members' mean deviation from their mean H, an error "
            "estimate made without DFT"
        )
    mean = {
        k: float(np.mean([r[k] for r in rows]))
        for k in ("h_mae_meV", "eig_mae_window_meV", "eig_mae_all_meV")
    }
    gpaw_t = float(np.sum(scf))
    warm = [r["model_s"] for r in rows[1:]] or [rows[0]["model_s"]]
    model_t = float(np.sum([r["model_s"] for r in rows]))
    speedup_warm = float(np.mean(scf[1:] or scf) / np.mean(warm))
    print(
        f"\n  mean H MAE {mean['h_mae_meV']:.1f} meV; eigenvalue MAE "
        f"{mean['eig_mae_window_meV']:.1f} meV within E_F +- 5 eV "
        f"({mean['eig_mae_all_meV']:.1f} meV over all states)"
    )
    print(
        f"  time: GPAW SCF {gpaw_t:.1f} s in total, model {model_t:.1f} s including the "
        f"one-time compilation; per molecule after compilation the model is "
        f"{speedup_warm:.0f}x faster than the GPAW SCF"
    )
    return {
        "mean": mean,
        "gpaw_scf_total_s": gpaw_t,
        "model_total_s": model_t,
        "speedup_after_compilation": speedup_warm,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the demo (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m ase_gearsh.demo", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--output", default="demo-output")
    p.add_argument("--seed", type=int, default=2026, help="snapshot seed (training used 7)")
    a = p.parse_args(argv)
    enable_compilation_cache()  # process-wide JAX setting: the program's, not the library's
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = RunSettings()  # the training data's settings
    images = [_prepare(x, settings) for x in molecule_snapshots(1, 0.08, a.seed)]
    write(out / "molecules.extxyz", images)
    print(f"model {a.model}")
    t = time.perf_counter()
    model = load_model(a.model)
    print(
        f"  loaded in {time.perf_counter() - t:.1f} s; trained on "
        f"{model.extra.get('n_train', '?')} structures of {', '.join(model.registry.symbols)}"
        + (f"; a committee of {len(model.members)} models" if len(model.members) > 1 else "")
    )
    preds = _predict(model, images)
    reference = _gpaw_reference(images, out, settings)
    if reference is None:
        return 1
    rows, panels = _compare(images, preds, *reference)
    figures = _report(rows, reference[1])
    _plot(out / "dos.png", panels)
    summary = {
        "model": str(a.model),
        "seed": a.seed,
        "structures": rows,
        **figures,
        "units": {"energy": "eV (MAE in meV)", "time": "s"},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"\nwrote {out}/dos.png, {out}/summary.json, {out}/dataset/ (GPAW reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
