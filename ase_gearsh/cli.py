"""The ``gearsh`` command: ``gearsh train CONFIG``, ``gearsh eval MODEL DATASET``."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _train(args):
    from .train import train
    run = train(args.config, resume=args.resume, output=args.output, progress=not args.quiet)
    print(f"finished: {run}/model.ckpt (best), {run}/metrics.csv, {run}/loss.png")


def _eval(args):
    from .evaluate import evaluate
    s = evaluate(args.model, args.dataset, output=args.output, limit=args.limit,
                 progress=not args.quiet, validation_only=args.validation_only)
    print(f"{s['structures']} structures of {s['dataset']}")
    print(f"  H MAE          {s['h_mae_meV']:9.3f} meV   (on-site {s['h_mae_onsite_meV']:.3f},"
          f" pair {s['h_mae_pair_meV']:.3f})")
    print(f"  eigenvalue MAE {s['eig_mae_window_meV']:9.3f} meV   within +-5 eV of E_F "
          f"(all states {s['eig_mae_all_meV']:.3f})")
    if args.output:
        print(f"  wrote {args.output}/summary.json, structures.csv, errors.png, parity.png")
    if args.json:
        print(json.dumps(s, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gearsh", description="GEARS H machine-learned "
                                "Hamiltonians: training and evaluation")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config")
    t.add_argument("-o", "--output", help="run folder (default data.directory/experiment)")
    t.add_argument("--resume", action="store_true", help="continue from latest.ckpt")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="H and eigenvalue errors of a model on a dataset")
    e.add_argument("model")
    e.add_argument("dataset")
    e.add_argument("-o", "--output", help="folder for summary.json, CSV and PNG files")
    e.add_argument("--limit", type=int, help="only the first N structures")
    e.add_argument("--validation-only", action="store_true",
                   help="only the structures the model was validated on (held out)")
    e.add_argument("--json", action="store_true", help="also print the summary as JSON")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_eval)
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .layout import RegistryError
    from .evaluate import EvaluationError
    from .train import TrainingError
    try:
        args.func(args)
    except (ConfigError, CheckpointError, RegistryError, TrainingError, EvaluationError,
            FileNotFoundError) as err:
        print(f"gearsh {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
