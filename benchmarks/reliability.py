"""Does the reliability figure rank predictions by their error?

    python benchmarks/reliability.py MODEL.ckpt DATASET [DATASET...] [--validation-only]
        [--limit N] [--csv OUT.csv]

For every structure of the datasets (with ``--validation-only`` the structures the
checkpoint was validated on, the interesting ones: training structures have small
errors and small figures): the reliability figure (largest per-atom score, see
``ase_gearsh.model.reliability``) and the H MAE against the dataset's stored H, both
from one prediction (``ase_gearsh.training.evaluate.predict_structure_blocks``).
Prints them per structure and the Spearman rank correlation between them; also the
per-atom correlation between an atom's score and the MAE of its on-site block.  The
model needs a reference: ``gearsh attach-reliability MODEL TRAINING_DATASET``.
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np
from scipy.stats import spearmanr

from ase_gearsh.core.data import Dataset
from ase_gearsh.model.engine import enable_compilation_cache, load_model
from ase_gearsh.model.inference import predictor_for
from ase_gearsh.model.reliability import reference_of, reliability_scores
from ase_gearsh.training.evaluate import predict_structure_blocks


class Recording:
    """The model's predictor, keeping its last result (the invariants of the atoms
    come with it, so the figure needs no second network run)."""

    def __init__(self, predictor):
        self.predictor, self.model, self.last = predictor, predictor.model, None

    def __call__(self, atoms, progress: bool = False):
        self.last = self.predictor(atoms, progress=progress)
        return self.last


def _ranked(x) -> np.ndarray:
    """inf (species without reference) ranks above every finite value."""
    x = np.asarray(x, float)
    finite = x[np.isfinite(x)]
    top = (finite.max() + 1.0) * 10.0 if finite.size else 1.0
    return np.where(np.isinf(x), top, x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("datasets", nargs="+", metavar="dataset")
    p.add_argument("--validation-only", action="store_true")
    p.add_argument("--limit", type=int, help="only the first N structures")
    p.add_argument("--csv", help="write the per-structure table here")
    args = p.parse_args(argv)
    enable_compilation_cache()
    model = load_model(args.model)
    ref = reference_of(model)
    if ref is None:
        print(
            f"{args.model} has no reliability reference; run `gearsh attach-reliability "
            f"{args.model} TRAINING_DATASET` first",
            file=sys.stderr,
        )
        return 2
    names = set(model.extra.get("valid_names") or []) if args.validation_only else None
    predictor = Recording(predictor_for(model))
    rows, atom_scores, atom_errors = [], [], []
    print(f"{'structure':40s} {'atoms':>6s} {'figure':>8s} {'worst':>6s} {'H MAE meV':>10s}")
    for path in args.datasets:
        for s in Dataset(path):
            name = s.meta["source"]["name"]
            if names is not None and name not in names:
                continue
            if args.limit is not None and len(rows) >= args.limit:
                break
            onsite, pairs = predict_structure_blocks(predictor, s)
            a = s.arrays
            d_on, d_pr = onsite - a["onsite_H"][0], pairs - a["pair_H"][0]
            mae = 1e3 * np.abs(np.concatenate([d_on, d_pr])).mean()
            symbols = s.atoms.get_chemical_symbols()
            scores = reliability_scores(ref, symbols, predictor.last.atom_invariants)
            worst = int(np.argmax(scores))
            # the MAE of each atom's on-site block against its score
            counts = np.asarray(s.orbital_counts)
            bounds = np.concatenate([[0], np.cumsum(counts**2)])
            atom_scores.append(scores)
            atom_errors.append(
                [1e3 * np.abs(d_on[b0:b1]).mean() for b0, b1 in zip(bounds[:-1], bounds[1:])]
            )
            row = {
                "name": name,
                "atoms": len(symbols),
                "figure": float(scores.max()),
                "worst_atom": f"{worst}{symbols[worst]}",
                "h_mae_meV": float(mae),
            }
            rows.append(row)
            print(
                f"{name[:40]:40s} {row['atoms']:6d} {row['figure']:8.3f} "
                f"{row['worst_atom']:>6s} {mae:10.3f}",
                flush=True,
            )
    if len(rows) < 3:
        print(f"only {len(rows)} structures: no correlation", file=sys.stderr)
        return 2
    figure = np.array([r["figure"] for r in rows])
    mae = np.array([r["h_mae_meV"] for r in rows])
    rho, pval = spearmanr(_ranked(figure), mae)
    rho_atoms, pval_atoms = spearmanr(
        _ranked(np.concatenate(atom_scores)), np.concatenate(atom_errors)
    )
    n_atoms = sum(len(x) for x in atom_scores)
    print(
        f"\n{len(rows)} structures; figure median {np.median(figure):.3f}, max {figure.max():.3f}"
    )
    print(f"Spearman rank correlation, figure vs H MAE: {rho:+.3f} (p = {pval:.2g})")
    print(
        f"Spearman, atom score vs the MAE of its on-site block ({n_atoms} atoms): "
        f"{rho_atoms:+.3f} (p = {pval_atoms:.2g})"
    )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
